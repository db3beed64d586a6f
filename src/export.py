"""Export: a SavedModel whose serving signature takes encoded images and returns the top-k classes,
in TF Serving's versioned layout, and the same model as an MLflow pyfunc model."""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import Model, infer_signature

from src import files
from src.data import decode_batch
from src.model import Network
from src.selection import LATENCY, PASSES, SIZE
from src.views import predict_views

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CLASSIFY_RESIZED = "classify_resized"
CLASS_NAMES = "class_names"
WARM_UP_CALLS = 5  # graph tracing, allocation: not timed
TIMED_CALLS = 20  # a latency is the median of these


def resized_inputs(network: Network) -> dict[str, tuple[int, int]]:
    """The `classify_resized` signature's inputs, name -> size: `images`, or one per input size (images_224x224,
    images_260x260) for backbones of different sizes."""
    sizes = network.image_sizes
    return sizes if isinstance(sizes, dict) else {"images": sizes}


def export_saved_model(model: keras.Model, network: Network, class_names: list[str], top_k: int, path: Path,
                       views=("identity",)) -> Path:
    """Write `path` (e.g. .../flowers/1) with three signatures:
    `serving_default`: image_bytes: string [batch] (JPEG/PNG; TF Serving REST: {"b64": ...})
      -> labels: int32 [batch, k], class_names: string [batch, k], scores: float32 [batch, k]; the scores are
      averaged over the test-time-augmentation `views`;
    `classify_resized`: images: uint8 [batch, height, width, 3] at the input size (one such input per size,
      `resized_inputs`, for backbones of different sizes) -> probabilities: float32 [batch, classes], one view
      (Network.classify_resized); what the TFLite export converts;
    `class_names`: no input -> class_names: string [classes], in label order."""
    k, sizes, inputs = min(top_k, len(class_names)), network.image_sizes, resized_inputs(network)
    classify = network.classify_resized(model.get_layer("head"))
    names = tf.constant(class_names)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        scores, labels = tf.math.top_k(predict_views(model, decode_batch(image_bytes, sizes), views), k=k)
        return {"labels": labels, "class_names": tf.gather(names, labels), "scores": scores}

    def classify_images(*images):
        return {"probabilities": classify(dict(zip(inputs, images)) if isinstance(sizes, dict) else images[0])}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint(CLASS_NAMES, tf.function(lambda: {"class_names": names}, input_signature=[]))
    archive.add_endpoint(CLASSIFY_RESIZED, tf.function(classify_images, input_signature=[
        tf.TensorSpec([None, *size, 3], tf.uint8, name=name) for name, size in inputs.items()]))
    archive.write_out(str(path), verbose=False)
    return path


def size_mb(*paths: Path) -> float:
    """The size of these files, and of every file under these folders, in MiB."""
    files = [f for path in map(Path, paths) for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def median_ms(call, calls: int = TIMED_CALLS) -> float:
    """The median time of `call()` in milliseconds, over `calls` calls after the warm-up calls."""
    for _ in range(WARM_UP_CALLS):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def serving_cost(saved_model: Path, image: bytes, backbones: int, views: int) -> dict[str, float]:
    """What serving the SavedModel costs on this machine: the median latency of one encoded `image` through
    `serving_default` (decode, every view, every backbone, the head), the backbone passes per image and the
    folder's size."""
    loaded = tf.saved_model.load(str(saved_model))  # the signature needs the object that holds its variables
    serve, batch = loaded.signatures["serving_default"], tf.constant([image])
    return {LATENCY: median_ms(lambda: serve(image_bytes=batch)), PASSES: backbones * views, SIZE: size_mb(saved_model)}


def log_pyfunc_model(saved_model_dir: Path, example_images: list[bytes]) -> mlflow.models.model.ModelInfo:
    """Log the SavedModel as MLflow model `model`: DataFrame column `image` (bytes) ->
    class_name, label, score (top-1) and top_k (a list of {class_name, label, score})."""
    from src.pyfunc_model import FlowerClassifier

    example = pd.DataFrame({"image": example_images})
    predictor = FlowerClassifier.from_saved_model(str(saved_model_dir))
    with warnings.catch_warnings():  # "integer columns cannot represent missing values": labels never miss
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, predictor.predict(None, example))
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"saved_model": str(saved_model_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=[f"tensorflow=={tf.__version__}", f"pandas=={pd.__version__}",
                          f"mlflow=={mlflow.__version__}"],
    )


MODELS_CONFIG = """model_config_list {{
  config {{
    name: "{name}"
    base_path: "{base_path}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: {version} }} }}
  }}
}}
"""


def saved_model_of(model_uri: str, dst: Path) -> Path:
    """Download a logged pyfunc model into `dst`; return the path of the SavedModel inside it."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    return local / Model.load(str(local / "MLmodel")).flavors["python_function"]["artifacts"]["saved_model"]["path"]


def write_tfserving(model_uri: str, base: Path, name: str, version: int, container_base: str = "/models") -> Path:
    """TF Serving's layout under `base`: <name>/<version>/saved_model.pb, and models.config serving exactly that
    version (TF Serving would otherwise serve the highest version in the folder, not the champion)."""
    target = base / name / str(version)
    with tempfile.TemporaryDirectory() as tmp, files.replaced(target, folder=True) as staged:
        shutil.copytree(saved_model_of(model_uri, Path(tmp)), staged, dirs_exist_ok=True)
    config = MODELS_CONFIG.format(name=name, base_path=f"{container_base}/{name}", version=version)
    (base / "models.config").write_text(config)
    return target
