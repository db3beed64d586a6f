"""Where one image's time goes inside the served model, in-process: the pyfunc call and the parts of it.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python -m experiments.serving_benchmark.profile_request \
        --model-uri runs:/<run id>/model [--runtime tflite_float16 --folder <its runtime models>] [--calls 300]

(`-m`, from the clone's root: it borrows scripts/benchmark_serving.py's test image.)

Loads the model as `make serve-best` does, with `serve.runtime` (the runtime models from --folder, else from
make export-tflite's folder, made when missing), then times each part on one real test JPEG: the mean of --calls
calls after 20 warm-up calls, one after another on an otherwise idle machine. The parts overlap (the pyfunc call
contains the others); what the listed parts leave of it is the rest (pandas, the top k, the JSON-ready rows).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from scripts.benchmark_serving import test_image, time_calls
from src import runtimes
from src.config import RUNTIMES, load_config
from src.pyfunc_model import LIMITS, read_image


def mean_ms(call, calls: int) -> float:
    """The mean, not the median (src/export.median_ms): the parts are read as shares of the whole call."""
    time_calls(call, 20)  # warm-up
    return 1000 * float(np.mean(time_calls(call, calls)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", required=True, help="e.g. runs:/<run id>/model or models:/flowers@champion")
    parser.add_argument("--runtime", default="savedmodel", choices=RUNTIMES)
    parser.add_argument("--folder", type=Path, help="the runtime models (default: make export-tflite's)")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    cfg = load_config()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(args.model_uri)
    predictor = model.unwrap_python_model()
    if args.runtime != "savedmodel":
        folder = args.folder or runtimes.runtime_model(mlflow.MlflowClient(), args.runtime, args.model_uri,
                                                       cfg.registry.model_name, Path(cfg.paths.runtimes_dir))[1]
        runtimes.serve_with(predictor, args.runtime, folder, model.metadata.run_id)
    image = test_image()
    frame, batch = pd.DataFrame({"image": [image]}), tf.constant([image])
    parts = {"pyfunc predict, all of it": lambda: model.predict(frame),
             "image check (read_image: PIL)": lambda: read_image(image, 0, LIMITS["max_pixels"]),
             "serving function (decode, model, top k)": lambda: predictor._serve(image_bytes=batch)}
    served = predictor._serve
    if isinstance(served, runtimes.ServedRuntime):
        images = {name: each.numpy() for name, each in served.decode(batch).items()}
        parts["  its decode and resize (TensorFlow)"] = lambda: served.decode(batch)
        parts[f"  the {args.runtime} model, on its thread"] = lambda: served.runner.submit(served.classify,
                                                                                            images).result()
    times = {name: mean_ms(call, args.calls) for name, call in parts.items()}
    total = times["pyfunc predict, all of it"]
    print(f"{args.model_uri} served with {args.runtime}; one {len(image):,}-byte test JPEG; mean of {args.calls} calls")
    print(pd.DataFrame({"ms": times, "share of the pyfunc call": {k: v / total for k, v in times.items()}})
          .to_markdown(floatfmt=".2f"))


if __name__ == "__main__":
    main()
