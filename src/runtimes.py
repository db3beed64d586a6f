"""CPU inference runtimes for the exported model: TFLite (float16, int8, int8_dynamic) run with the LiteRT
interpreter (`ai-edge-litert`; TensorFlow's own deprecated `tf.lite.Interpreter` if it is missing) and OpenVINO,
compared with the SavedModel on the test split: accuracy, agreement, size and one-image latency, each over the
model's test-time views, as served.

All of them convert the SavedModel's `classify_resized` signature: uint8 images already resized to the model's
input size (`decode_and_resize`, as in training; one input per size for backbones of different sizes) -> class
probabilities; the scaling to [0, 1] is inside. Images go in as a dict, input name -> uint8 batch. The
TFLite models' class names are in `labels.txt` beside them, one per line, in label order, and the model's
test-time views in `views.txt`.

`make serve-best RUNTIME=openvino|tflite|tflite_int8_dynamic|tflite_float16` serves the OpenVINO, the int8, the
dynamic-range int8 or the float16 TFLite model through the same pyfunc model (its checks, its JSON):
`ServedRuntime` takes the place of the SavedModel's `serving_default`.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

import numpy as np
import pandas as pd
import tensorflow as tf

from src import files, plots, progress, register, stats
from src.config import UserError
from src.data import decode_batch, load_splits, make_batches
from src.export import CLASSIFY_RESIZED, median_ms, saved_model_of, size_mb
from src.track import run_config
from src.views import parse_views, predict_views

QUANTIZATIONS = ("float16", "int8", "int8_dynamic")
REPRESENTATIVE = 200  # train images that calibrate int8
# serve.runtime -> the file it serves
SERVED = {"openvino": "openvino.xml", "tflite": "int8.tflite", "tflite_int8_dynamic": "int8_dynamic.tflite",
          "tflite_float16": "float16.tflite"}


def convert(saved_model_dir: Path, quantization: str, representative: dict[str, np.ndarray] | None = None) -> bytes:
    """float16: weights stored as float16. int8: weights and activations int8 (post-training quantisation),
    calibrated on `representative` images (input name -> uint8 [n, height, width, 3], from train). int8_dynamic:
    weights int8, activations float, quantised on the fly where a kernel computes in int8 (dynamic range: no
    calibration, closer to the float model than int8, slower)."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization {quantization!r} is unknown; use one of: {', '.join(QUANTIZATIONS)}")
    count = len(next(iter(representative.values()))) if representative else 0
    if quantization == "int8" and not count:
        raise UserError("int8 conversion needs representative train images to calibrate on")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[CLASSIFY_RESIZED])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        converter.representative_dataset = lambda: ({name: images[i][None] for name, images in representative.items()}
                                                     for i in range(count))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def interpreter(model: bytes | Path, threads: int | None = None):
    """A LiteRT interpreter for a .tflite file or its bytes, on `threads` threads (default: every core, as
    TensorFlow and OpenVINO use; LiteRT's own default is one)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated since 2.20
        Interpreter = tf.lite.Interpreter
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    return Interpreter(**source, num_threads=threads or os.cpu_count())


class Classifier:
    """uint8 images at the input size(s), input name -> batch -> probabilities, with one TFLite interpreter."""

    def __init__(self, model: bytes | Path, threads: int | None = None):
        try:
            self.runner = interpreter(model, threads).get_signature_runner(CLASSIFY_RESIZED)
        except ValueError as error:
            raise UserError(f"{model if isinstance(model, Path) else 'the model'} is not a TFLite export of this "
                            f"project ({' '.join(str(error).split())[:120]}); write one with make export-tflite") from None
        self.input_sizes = {name: tuple(int(d) for d in details["shape"][1:3])
                            for name, details in self.runner.get_input_details().items()}

    def __call__(self, images: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner(**images)["probabilities"]


class OpenVINOClassifier:
    """uint8 images at the input size(s), input name -> batch -> probabilities, with OpenVINO's CPU plugin, in
    float32 unless `hint` says otherwise. Left to itself the plugin computes in bfloat16 on CPUs that have it, and
    then agreed with the SavedModel on fewer answers: 99.1 % of validation against 99.8 % in float32
    (experiments/serving_benchmark). `precision`: the inference precision the plugin runs at. `threads`: the
    plugin's (default: its own choice, every core)."""

    def __init__(self, xml: Path, hint: str = "f32", threads: int | None = None):
        import openvino

        config = {"INFERENCE_PRECISION_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.compiled = openvino.Core().compile_model(str(xml), "CPU", config)
        self.input_sizes = {port.get_any_name(): tuple(port.get_partial_shape()[i].get_length() for i in (1, 2))
                            for port in self.compiled.inputs}
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def __call__(self, images: dict[str, np.ndarray]) -> np.ndarray:
        return self.compiled(images)[0]


def to_openvino(saved_model_dir: Path, folder: Path) -> OpenVINOClassifier:
    """The signature as an OpenVINO model, saved as `folder`/openvino.{xml,bin} (weights compressed to float16,
    OpenVINO's default)."""
    import openvino

    loaded = tf.saved_model.load(str(saved_model_dir))  # alive while its signature is converted
    openvino.save_model(openvino.convert_model(loaded.signatures[CLASSIFY_RESIZED]), str(folder / "openvino.xml"))
    return OpenVINOClassifier(folder / "openvino.xml")


def with_views(classify, views: tuple[str, ...]):
    """`classify` (uint8 images by input name -> probabilities) averaged over the test-time `views`, as the
    SavedModel's `serving_default` averages them (src/views.py's `predict_views`)."""
    if tuple(views) == ("identity",):
        return classify

    def model(viewed: dict[str, tf.Tensor], training: bool) -> np.ndarray:
        return classify({name: np.asarray(each) for name, each in viewed.items()})
    return lambda images: predict_views(model, images, views).numpy()


def served_views(run_id: str) -> tuple[str, ...]:
    """The test-time views the run's model averages over (its `model.tta`)."""
    return parse_views(run_config(run_id).model.tta, "model.tta")


class ServedRuntime:
    """A runtime in the place of the SavedModel's `serving_default`: encoded images -> the same decoding, the
    same test-time views, the top k as tensors (labels, class_names, scores). The runtime runs one call at a
    time, always on the same thread: neither a LiteRT interpreter nor an OpenVINO infer request may be shared by
    threads, and OpenVINO's memory grows with the threads that call it (called from the server's pool, dozens of
    threads, one at a time, the server's RSS grew 23 % over 2,000 requests; from one thread, 1 %)."""

    def __init__(self, classifier, class_names: list[str], views: tuple[str, ...], k: int):
        self.classify, self.k, self.runner = with_views(classifier, views), k, ThreadPoolExecutor(1)
        self.names = tf.constant(class_names)
        self.decode = tf.function(lambda image_bytes: decode_batch(image_bytes, classifier.input_sizes),
                                  input_signature=[tf.TensorSpec([None], tf.string)])

    def __call__(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = {name: each.numpy() for name, each in self.decode(image_bytes).items()}
        probabilities = self.runner.submit(self.classify, images).result()
        scores, labels = tf.math.top_k(probabilities, k=self.k)
        return {"labels": labels, "class_names": tf.gather(self.names, labels), "scores": scores}


def serve_with(predictor, runtime: str, folder: Path, run_id: str, threads: int | None = None) -> None:
    """Make the pyfunc model `predictor` (src/pyfunc_model.py) run the `runtime` model of `folder` in the place of
    its SavedModel, with the same class names, views and k, on `threads` threads (default: every core)."""
    path = folder / SERVED[runtime]
    classifier = OpenVINOClassifier(path, threads=threads) if runtime == "openvino" else Classifier(path, threads)
    k = predictor._serve.structured_outputs["scores"].shape[-1]
    predictor._serve = ServedRuntime(classifier, predictor.class_names, served_views(run_id), k)


def runtime_model(client: mlflow.MlflowClient, runtime: str, model_uri: str | None, name: str,
                  output: Path) -> tuple[str, Path]:
    """The model to serve with `runtime` (the champion's registry version when `model_uri` is None) and the folder
    of its runtime models under `output`, as make export-tflite writes them; they are made now when missing."""
    if runtime == "openvino" and importlib.util.find_spec("openvino") is None:
        raise UserError("serve.runtime=openvino needs the openvino package: make install-all, or "
                        "pip install -e '.[export]'")
    uri, run_id, label = resolve_model(client, model_uri, name)
    folder = output / label
    if not (folder / SERVED[runtime]).is_file():
        print(f"no {runtime} model in {folder}: making it as make export-tflite does (conversions, then the test "
              "split through each model)", flush=True)
        export(uri, run_id, folder, REPRESENTATIVE, None)
    return uri, folder


def agreement(runtime: str, folder: Path) -> str:
    """How often the `runtime` model of `folder` agreed with its SavedModel, from its export's comparison."""
    path = folder / "comparison.csv"
    if not path.is_file():
        return f"no comparison in {folder}: make export-tflite measures how often {runtime} agrees with the SavedModel"
    table = pd.read_csv(path)
    stem = Path(SERVED[runtime]).stem  # the model's row: "int8", or "openvino (f32)" with its precision
    rows = list(table[(table["model"] == stem) | table["model"].str.startswith(f"{stem} (")].itertuples())
    if len(rows) != 1:
        return f"no row for {runtime} in {path}: make export-tflite measures how often it agrees with the SavedModel"
    [row] = rows
    split = plots.accuracy_column(table).split("/")[0]
    return (f"{runtime} agreed with the SavedModel on {100 * row.agreement_with_saved_model:.2f} % "
            f"[{100 * row.agreement_low:.2f}, {100 * row.agreement_high:.2f}] of {row.images} {split} images ({path})")


def compare(saved_model_dir: Path, files: dict[str, list[Path]], runners: dict, batches,
            latency_image: dict[str, np.ndarray], latency_runs: int = 50, images: int | None = None,
            views: tuple[str, ...] = ("identity",), split: str = "test") -> pd.DataFrame:
    """Each model's accuracy on `batches` of (uint8 images by input name, labels) of `split`, as the column
    `<split>/accuracy`, its top-1 agreement with the SavedModel (with a bootstrap 95 % interval over the images),
    its size (`files`) and its median latency for one image on this CPU, each over the test-time `views`.
    `runners`: name -> function of uint8 images by input name; the SavedModel comes first. `images`: how many
    `batches` hold, for the progress bar."""
    loaded = tf.saved_model.load(str(saved_model_dir))  # the signature needs the object that holds its variables
    reference = loaded.signatures[CLASSIFY_RESIZED]
    models = {"saved_model": lambda images: reference(**{k: tf.constant(v) for k, v in images.items()})
              ["probabilities"].numpy(),
              **runners}
    models = {name: with_views(model, views) for name, model in models.items()}
    files = {"saved_model": [Path(saved_model_dir)], **files}
    predicted = {name: [] for name in models}
    labels = []
    with progress.bar(images, f"{split} images through {len(models)} models", "img") as bar:
        for batch, batch_labels in batches:
            batch = {name: each.numpy() for name, each in batch.items()}
            for name, model in models.items():
                predicted[name].append(model(batch).argmax(axis=1))
            labels.append(batch_labels.numpy())
            bar.update(len(labels[-1]))
    labels = np.concatenate(labels)
    predicted = {name: np.concatenate(p) for name, p in predicted.items()}
    sizes = {name: size_mb(*paths) for name, paths in files.items()}
    rows = []
    for name, model in models.items():
        agree = predicted[name] == predicted["saved_model"]
        low, high = stats.accuracy_interval(agree)
        rows.append({"model": name, f"{split}/accuracy": float((predicted[name] == labels).mean()),
                     "agreement_with_saved_model": float(agree.mean()), "agreement_low": low, "agreement_high": high,
                     "size_mb": sizes[name], "latency_ms": _latency(model, latency_image, latency_runs),
                     "images": len(labels)})
    table = pd.DataFrame(rows)
    table["size_vs_saved_model"] = table["size_mb"] / table.loc[0, "size_mb"]
    table["accuracy_vs_saved_model_points"] = 100 * (table[f"{split}/accuracy"] - table.loc[0, f"{split}/accuracy"])
    return table


def _latency(model, image: dict[str, np.ndarray], runs: int) -> float:
    batch = {name: each[None] for name, each in image.items()}
    return median_ms(lambda: model(batch), runs)


def resolve_model(client: mlflow.MlflowClient, model_uri: str | None, name: str) -> tuple[str, str, str]:
    """(model URI, its run id, a folder name): the champion's registry version when `model_uri` is None."""
    if model_uri is None:
        champion = register.require_champion(client, name)
        return f"models:/{name}/{champion.version}", champion.run_id, f"{name}-v{champion.version}"
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as error:
        raise UserError(f"cannot find model {model_uri}: {' '.join(str(error).split())[:200]}") from None
    if not info.run_id:
        raise UserError(f"model {model_uri} was not logged by a training run; export a model of this project")
    return model_uri, info.run_id, f"run-{info.run_id}"


def input_sizes(saved_model_dir: Path) -> dict[str, tuple[int, int]]:
    """The sizes `classify_resized` takes images at, by input name: the model's input size(s)."""
    loaded = tf.saved_model.load(str(saved_model_dir))
    if CLASSIFY_RESIZED not in loaded.signatures:
        raise UserError(f"{saved_model_dir} has no '{CLASSIFY_RESIZED}' signature: an older version of this "
                        "project exported it; train and register a new model")
    inputs = loaded.signatures[CLASSIFY_RESIZED].structured_input_signature[1]
    return {name: (int(spec.shape[1]), int(spec.shape[2])) for name, spec in inputs.items()}


def calibration_images(train, sizes: dict[str, tuple[int, int]], count: int, seed: int) -> dict[str, np.ndarray]:
    """The `count` train images int8 calibrates on, shuffled by the run's seed: input name -> uint8 batch."""
    batch = next(iter(make_batches(train, sizes, count, shuffle_seed=seed)))[0]
    return {name: images.numpy() for name, images in batch.items()}


def logs_to_run(split: str, images: int | None) -> bool:
    """Whether an export's comparison goes to the run: only one on all of test, which it would otherwise replace."""
    return split == "test" and images is None


def export(model_uri: str, run_id: str, folder: Path, representative: int, images: int | None,
           split: str = "test") -> pd.DataFrame:
    """Convert to TFLite float16, int8 (calibrated on train images) and int8_dynamic, and to OpenVINO (when
    installed), compare each with the SavedModel on `split` (test, or validation to choose a runtime before
    test is read; `images`: its first N only), and write `folder`; log it to the run only when all of test was
    compared.
    The folder is swapped in whole at the end: a failure leaves the previous export and the run as they were."""
    from tensorflow.lite.python.convert import ConverterError  # not in the public tf.lite API

    run = mlflow.get_run(run_id)
    if run.data.tags.get("precision", "float32") != "float32":
        raise UserError(f"run {run_id} trained in {run.data.tags['precision']}; TFLite and OpenVINO export a "
                        "float32 model: train one with trainer.mixed_precision=false")
    run_cfg = run_config(run_id)
    splits = load_splits(run_cfg.data)
    with tempfile.TemporaryDirectory() as tmp, files.replaced(folder, folder=True) as staging:
        saved_model = saved_model_of(model_uri, Path(tmp))
        sizes = input_sizes(saved_model)
        calibration = calibration_images(splits.train, sizes, representative, run_cfg.seed)
        written, runners = {}, {}
        targets = [*QUANTIZATIONS, *(["openvino"] if importlib.util.find_spec("openvino") else [])]
        try:
            for target in progress.each(targets, "converting", "model"):
                if target == "openvino":
                    runners[target] = to_openvino(saved_model, staging)
                    written[target] = [staging / "openvino.xml", staging / "openvino.bin"]
                else:
                    written[target] = [staging / f"{target}.tflite"]
                    written[target][0].write_bytes(convert(saved_model, target, calibration))
                    runners[target] = Classifier(written[target][0])
        except (ConverterError, RuntimeError) as error:
            raise UserError(f"cannot convert {model_uri}: {' '.join(str(error).split())[:300]}") from None
        compared = splits.test if split == "test" else splits.validation
        compared = compared.take(images) if images else compared
        batches = make_batches(compared, sizes, 32)
        views = parse_views(run_cfg.model.tta, "model.tta")
        table = compare(saved_model, written, runners, batches,
                        {k: v.numpy()[0] for k, v in next(iter(batches))[0].items()},
                        images=int(compared.cardinality()), views=views, split=split)
        if "openvino" in runners:
            table.loc[table["model"] == "openvino", "model"] = f"openvino ({runners['openvino'].precision})"
        (staging / "labels.txt").write_text("\n".join(splits.class_names) + "\n")
        (staging / "views.txt").write_text("\n".join(views) + "\n")
        table.to_csv(staging / "comparison.csv", index=False)
        (staging / "comparison.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
        figure = plots.model_comparison(table, f"{model_uri}: SavedModel against TFLite and OpenVINO on "
                                               f"{int(table.images[0])} {split} images (this CPU)")
        figure.savefig(staging / "comparison.png", dpi=110)
        plots.plt.close(figure)
        if logs_to_run(split, images):
            mlflow.MlflowClient().log_artifacts(run_id, str(staging), "tflite")
    return table
