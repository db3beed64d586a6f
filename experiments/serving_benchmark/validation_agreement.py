"""The champion's runtime models on the validation split, not test: accuracy and top-1 agreement with the
SavedModel, each over the model's test-time views, with OpenVINO at bfloat16 (its CPU plugin's own choice on a
CPU that has it) and at float32.

    python experiments/serving_benchmark/validation_agreement.py outputs/tflite/flowers-v1   # after make export-tflite

Output of 2026-12-06: validation_agreement.md.
"""
import sys
import tempfile
from pathlib import Path

import mlflow

from src import runtimes
from src.data import load_splits, make_batches
from src.export import saved_model_of
from src.track import run_config
from src.views import parse_views

client = mlflow.MlflowClient()
uri, run_id, _ = runtimes.resolve_model(client, None, "flowers")
cfg = run_config(run_id)
splits = load_splits(cfg.data)
views = parse_views(cfg.model.tta, "model.tta")
folder = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    sm = saved_model_of(uri, Path(tmp))
    sizes = runtimes.input_sizes(sm)
    files = {"openvino_bf16": "openvino.xml", "openvino_f32": "openvino.xml", "int8_dynamic": "int8_dynamic.tflite",
             "float16": "float16.tflite", "int8": "int8.tflite"}
    runners = {name: runtimes.OpenVINOClassifier(folder / file, name.removeprefix("openvino_"))
               if name.startswith("openvino") else runtimes.Classifier(folder / file) for name, file in files.items()}
    print({name: runner.precision for name, runner in runners.items() if name.startswith("openvino")})
    files = {name: [folder / file] for name, file in files.items()}
    batches = make_batches(splits.validation, sizes, 32)
    first = {k: v.numpy()[0] for k, v in next(iter(batches))[0].items()}
    table = runtimes.compare(sm, files, runners, batches, first, latency_runs=20, images=1020, views=views,
                             split="validation")
    print(table.to_markdown(index=False, floatfmt=".4g"))
