"""The champion as TFLite and OpenVINO models, compared with its SavedModel on test (or validation).

    python scripts/export_tflite.py                      # or: make export-tflite
    python scripts/export_tflite.py --model-uri runs:/<run id>/model --images 500
    python scripts/export_tflite.py --split validation   # choose among the runtimes before test is read

Writes <output>/<name>-v<version>/{float16,int8,int8_dynamic}.tflite, labels.txt, views.txt (the model's
test-time views), openvino.{xml,bin} (when the openvino package is installed), and comparison.{csv,md,png}: test
accuracy, agreement with the SavedModel (with its 95 % interval), size and one-image CPU latency of each (every
runtime on every core). The same files are logged to the model's MLflow run under tflite/ (not with --images).
The int8 model is calibrated on train images, never on test. `--split validation` compares on validation
instead, into <name>-v<version>-validation/, and logs nothing.
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
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the split the models are compared on (default: test)")
    parser.add_argument("--images", "--test-images", type=int,
                        help="compare on the first N images of the split (default: all)")
    args = parser.parse_args(argv)
    if args.representative < 1 or (args.images is not None and args.images < 1):
        raise UserError("--representative and --images must be positive")
    uri, run_id, label = runtimes.resolve_model(mlflow.MlflowClient(), args.model_uri, cfg.registry.model_name)
    folder = args.output / (label if args.split == "test" else f"{label}-validation")
    table = runtimes.export(uri, run_id, folder, args.representative, args.images, args.split)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if runtimes.logs_to_run(args.split, args.images):
        print(f"-> {folder} (logged to run {run_id} under tflite/)")
    else:
        print(f"-> {folder} (not logged to the run: {'part of test' if args.split == 'test' else args.split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
