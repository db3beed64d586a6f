"""The champion quantised by LiteRT Quantizer's recipes, against its SavedModel and its float16 model, on the
validation split, over the model's views (the seventh serving round, README.md).

    pip install litert-quantizer==0.11.0     # not a project requirement
    python experiments/serving_benchmark/litert_quantizer_recipes.py /tmp/r7   # the champion of the store in use

The static recipes calibrate on the same train images as make export-tflite's int8."""
import sys
import tempfile
from pathlib import Path

import mlflow
import tensorflow as tf
from litert_quantizer import quantizer, recipe

from src import runtimes
from src.data import load_splits, make_batches
from src.export import CLASSIFY_RESIZED, saved_model_of
from src.track import run_config
from src.views import parse_views

RECIPES = ["static_wi8_ai8", "static_wi8_ai16", "dynamic_wi8_afp32", "weight_only_wi8_afp32"]

uri, run_id, _ = runtimes.resolve_model(mlflow.MlflowClient(), None, "flowers")
cfg = run_config(run_id)
splits = load_splits(cfg.data)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    sm = saved_model_of(uri, Path(tmp))
    sizes = runtimes.input_sizes(sm)
    calibration = runtimes.calibration_images(splits.train, sizes, runtimes.REPRESENTATIVE, cfg.seed)
    samples = [{name: images[i:i + 1] for name, images in calibration.items()} for i in range(runtimes.REPRESENTATIVE)]
    float32 = out / "float32.tflite"
    float32.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(sm), signature_keys=[CLASSIFY_RESIZED]).convert())
    files = {"float16": out / "float16.tflite"}
    files["float16"].write_bytes(runtimes.convert(sm, "float16"))
    for name in RECIPES:
        qt = quantizer.Quantizer(str(float32))
        qt.load_quantization_recipe(getattr(recipe, name)())
        calibrated = qt.calibrate({CLASSIFY_RESIZED: samples}) if qt.need_calibration else None
        files[name] = out / f"{name}.tflite"
        qt.quantize(calibrated).export_model(str(files[name]), overwrite=True)
    runners = {name: runtimes.Classifier(path) for name, path in files.items()}
    batches = make_batches(splits.validation, sizes, 32)
    first = {k: v.numpy()[0] for k, v in next(iter(batches))[0].items()}
    table = runtimes.compare(sm, {name: [path] for name, path in files.items()}, runners, batches, first,
                             latency_runs=20, images=1020, views=parse_views(cfg.model.tta, "model.tta"),
                             split="validation")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    table.to_csv(out / "validation.csv", index=False)
