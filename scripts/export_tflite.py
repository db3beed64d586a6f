"""The champion as TFLite models (float16, int8, dynamic-range int8) and an OpenVINO model, checked on test.

    python scripts/export_tflite.py                      # or: make export-tflite
    python scripts/export_tflite.py --model-uri runs:/<run id>/model --test-images 500

Writes <output>/<name>-v<version>/{float16,int8,int8_dynamic}.tflite, labels.txt, views.txt (the model's
test-time views), openvino.{xml,bin} (when the openvino package is installed), and comparison.{csv,md,png}: test
accuracy, agreement with the SavedModel (with its 95 % interval), size and one-image CPU latency of each (every
runtime on every core). The same files are logged to the model's MLflow run under tflite/ (not with --test-images). The int8 model is calibrated on train images, never on test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

from src import cli, runtimes
from src.config import UserError


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help=f"default models:/{cfg.registry.model_name}@champion")
    parser.add_argument("--output", type=Path, default=Path(cfg.paths.runtimes_dir))
    parser.add_argument("--representative", type=int, default=runtimes.REPRESENTATIVE,
                        help="train images that calibrate int8")
    parser.add_argument("--test-images", type=int, help="compare on the first N test images (default: all)")
    args = parser.parse_args(argv)
    if args.representative < 1 or (args.test_images is not None and args.test_images < 1):
        raise UserError("--representative and --test-images must be positive")
    uri, run_id, label = runtimes.resolve_model(mlflow.MlflowClient(), args.model_uri, cfg.registry.model_name)
    folder = args.output / label
    table = runtimes.export(uri, run_id, folder, args.representative, args.test_images)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"-> {folder}" + (f" (logged to run {run_id} under tflite/)" if args.test_images is None else
                             " (not logged to the run: only part of test was compared)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
