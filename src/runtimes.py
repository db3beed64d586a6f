"""CPU inference runtimes for the exported model: TFLite (float16, int8) run with the LiteRT interpreter
(`ai-edge-litert`; TensorFlow's own deprecated `tf.lite.Interpreter` if it is missing) and OpenVINO, compared
with the SavedModel on the test split: accuracy, agreement, size and one-image latency.

All of them convert the SavedModel's `classify_resized` signature: uint8 images already resized to the model's
input size (`decode_and_resize`, as in training) -> class probabilities; the scaling to [0, 1] is inside. The
TFLite models' class names are in `labels.txt` beside them, one per line, in label order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from src.config import UserError
from src.export import CLASSIFY_RESIZED, size_mb

QUANTIZATIONS = ("float16", "int8")


def convert(saved_model_dir: Path, quantization: str, representative: np.ndarray | None = None) -> bytes:
    """float16: weights stored as float16. int8: weights and activations int8 (post-training quantisation),
    calibrated on `representative` images (uint8, [n, height, width, 3], from train)."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization {quantization!r} is unknown; use one of: {', '.join(QUANTIZATIONS)}")
    if quantization == "int8" and (representative is None or not len(representative)):
        raise UserError("int8 conversion needs representative train images to calibrate on")
    loaded = tf.saved_model.load(str(saved_model_dir))
    if CLASSIFY_RESIZED not in loaded.signatures:
        raise UserError(f"{saved_model_dir} has no '{CLASSIFY_RESIZED}' signature: an older version of this "
                        "project exported it; train and register a new model")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[CLASSIFY_RESIZED])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    else:
        converter.representative_dataset = lambda: ({"images": image[None]} for image in representative)
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
    """uint8 images at the input size -> probabilities, with one TFLite interpreter."""

    def __init__(self, model: bytes | Path, threads: int | None = None):
        try:
            self.runner = interpreter(model, threads).get_signature_runner(CLASSIFY_RESIZED)
        except ValueError as error:
            raise UserError(f"{model if isinstance(model, Path) else 'the model'} is not a TFLite export of this "
                            f"project ({' '.join(str(error).split())[:120]}); write one with make export-tflite") from None
        details = self.runner.get_input_details()["images"]
        self.input_size = tuple(int(d) for d in details["shape"][1:3])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.runner(images=images)["probabilities"]


def to_openvino(saved_model_dir: Path, folder: Path):
    """The signature as an OpenVINO model, saved as `folder`/openvino.{xml,bin} (weights compressed to float16,
    OpenVINO's default); returns a function of uint8 images and the inference precision OpenVINO's CPU plugin
    chose (bfloat16 on CPUs with bfloat16 units, unless told otherwise)."""
    import openvino

    loaded = tf.saved_model.load(str(saved_model_dir))  # alive while its signature is converted
    openvino.save_model(openvino.convert_model(loaded.signatures[CLASSIFY_RESIZED]), str(folder / "openvino.xml"))
    compiled = openvino.Core().compile_model(str(folder / "openvino.xml"), "CPU")
    return (lambda images: compiled(images)[0]), compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def compare(saved_model_dir: Path, files: dict[str, list[Path]], runners: dict, batches, latency_image: np.ndarray,
            latency_runs: int = 50) -> pd.DataFrame:
    """Each model's accuracy on `batches` of (uint8 images, labels), its top-1 agreement with the SavedModel,
    its size (`files`) and its median latency for one image on this CPU. `runners`: name -> function of uint8
    images; the SavedModel comes first."""
    loaded = tf.saved_model.load(str(saved_model_dir))  # the signature needs the object that holds its variables
    reference = loaded.signatures[CLASSIFY_RESIZED]
    models = {"saved_model": lambda images: reference(images=tf.constant(images))["probabilities"].numpy(),
              **runners}
    files = {"saved_model": [Path(saved_model_dir)], **files}
    predicted = {name: [] for name in models}
    labels = []
    for images, batch_labels in batches:
        images = images.numpy()
        for name, model in models.items():
            predicted[name].append(model(images).argmax(axis=1))
        labels.append(batch_labels.numpy())
    labels = np.concatenate(labels)
    predicted = {name: np.concatenate(p) for name, p in predicted.items()}
    sizes = {name: size_mb(*paths) for name, paths in files.items()}
    rows = []
    for name, model in models.items():
        rows.append({"model": name, "test/accuracy": float((predicted[name] == labels).mean()),
                     "agreement_with_saved_model": float((predicted[name] == predicted["saved_model"]).mean()),
                     "size_mb": sizes[name], "latency_ms": _latency(model, latency_image, latency_runs),
                     "images": len(labels)})
    table = pd.DataFrame(rows)
    table["size_vs_saved_model"] = table["size_mb"] / table.loc[0, "size_mb"]
    table["accuracy_vs_saved_model_points"] = 100 * (table["test/accuracy"] - table.loc[0, "test/accuracy"])
    return table


def _latency(model, image: np.ndarray, runs: int) -> float:
    batch = image[None]
    for _ in range(5):  # warm up: graph tracing, allocation
        model(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))
