"""The champion as float16 and int8 TFLite models and an OpenVINO model, checked against its SavedModel on test.

    python scripts/export_tflite.py                      # or: make export-tflite
    python scripts/export_tflite.py --model-uri runs:/<run id>/model --test-images 500

Writes <output>/<name>-v<version>/{float16,int8}.tflite, labels.txt, openvino.{xml,bin} (when the openvino
package is installed), and comparison.{csv,md,png}: test accuracy, agreement with the SavedModel, size and
one-image CPU latency of each (every runtime on every core). The same files are logged to the model's MLflow
run under tflite/ (not with --test-images). The int8 model is calibrated on train images, never on test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from tensorflow.lite.python.convert import ConverterError  # noqa: E402  (not in the public tf.lite API)

from src import register  # noqa: E402
from src.track import run_config  # noqa: E402
from src.config import PROJECT_ROOT, UserError, load_config, model_input_size  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = load_config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help=f"default models:/{cfg.registry.model_name}@champion")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "tflite")
    parser.add_argument("--representative", type=int, default=200, help="train images that calibrate int8")
    parser.add_argument("--test-images", type=int, help="compare on the first N test images (default: all)")
    args = parser.parse_args(argv)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        if args.representative < 1 or (args.test_images is not None and args.test_images < 1):
            raise UserError("--representative and --test-images must be positive")
        uri, run_id, label = _model(mlflow.MlflowClient(), args.model_uri, cfg.registry.model_name)
        folder = args.output / label
        table = export(uri, run_id, folder, args.representative, args.test_images)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"-> {folder}" + (f" (logged to run {run_id} under tflite/)" if args.test_images is None else
                             " (not logged to the run: only part of test was compared)"))
    return 0


def _model(client: mlflow.MlflowClient, model_uri: str | None, name: str) -> tuple[str, str, str]:
    """(model URI, its run id, a folder name)."""
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


def export(model_uri: str, run_id: str, folder: Path, representative: int, test_images: int | None):
    """Convert, compare and write `folder`; log it to the run unless only part of test was compared. The folder
    is swapped in whole at the end: a failure leaves the previous export and the run as they were."""
    from src import plots, runtimes
    from src.data import load_splits, make_batches
    from src.export import saved_model_of

    run = mlflow.get_run(run_id)
    if run.data.tags.get("precision", "float32") != "float32":
        raise UserError(f"run {run_id} trained in {run.data.tags['precision']}; TFLite and OpenVINO export a "
                        "float32 model: train one with trainer.mixed_precision=false")
    run_cfg = run_config(run_id)
    size, splits = model_input_size(run_cfg), load_splits(run_cfg.data)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".") as tmp:  # same file system: a rename swaps
        saved_model, staging = saved_model_of(model_uri, Path(tmp) / "download"), Path(tmp) / "staging"
        staging.mkdir()
        calibration = next(iter(make_batches(splits.train, size, representative, shuffle_seed=run_cfg.seed)))[0].numpy()
        files, runners = {}, {}
        try:
            for quantization in runtimes.QUANTIZATIONS:
                files[quantization] = [staging / f"{quantization}.tflite"]
                files[quantization][0].write_bytes(runtimes.convert(saved_model, quantization, calibration))
                runners[quantization] = runtimes.Classifier(files[quantization][0])
            if importlib.util.find_spec("openvino"):
                runners["openvino"], openvino_precision = runtimes.to_openvino(saved_model, staging)
                files["openvino"] = [staging / "openvino.xml", staging / "openvino.bin"]
        except (ConverterError, RuntimeError) as error:
            raise UserError(f"cannot convert {model_uri}: {' '.join(str(error).split())[:300]}") from None
        test = make_batches(splits.test.take(test_images) if test_images else splits.test, size, 32)
        table = runtimes.compare(saved_model, files, runners, test, next(iter(test))[0].numpy()[0])
        if "openvino" in runners:
            table.loc[table["model"] == "openvino", "model"] = f"openvino ({openvino_precision})"
        (staging / "labels.txt").write_text("\n".join(splits.class_names) + "\n")
        table.to_csv(staging / "comparison.csv", index=False)
        (staging / "comparison.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
        figure = plots.model_comparison(table, f"{model_uri}: SavedModel against TFLite and OpenVINO on "
                                               f"{int(table.images[0])} test images (this CPU)")
        figure.savefig(staging / "comparison.png", dpi=110)
        plots.plt.close(figure)
        if test_images is None:  # a comparison on part of test would replace the full one in the run
            mlflow.MlflowClient().log_artifacts(run_id, str(staging), "tflite")
        if folder.exists():
            os.replace(folder, Path(tmp) / "previous")
        os.replace(staging, folder)
    return table

if __name__ == "__main__":
    sys.exit(main())
