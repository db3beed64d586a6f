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
import openvino

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
    class OV:
        def __init__(self, precision):
            self.compiled = openvino.Core().compile_model(str(folder / "openvino.xml"), "CPU",
                                                          {"INFERENCE_PRECISION_HINT": precision})
            print(precision, self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        def __call__(self, images):
            return self.compiled(images)[0]
    runners = {"openvino_bf16": OV("bf16"), "openvino_f32": OV("f32"),
               "int8_dynamic": runtimes.Classifier(folder / "int8_dynamic.tflite"),
               "float16": runtimes.Classifier(folder / "float16.tflite"),
               "int8": runtimes.Classifier(folder / "int8.tflite")}
    files = {"openvino_bf16": [folder / "openvino.xml"], "openvino_f32": [folder / "openvino.xml"],
             "int8_dynamic": [folder / "int8_dynamic.tflite"], "float16": [folder / "float16.tflite"],
             "int8": [folder / "int8.tflite"]}
    batches = make_batches(splits.validation, sizes, 32)
    first = {k: v.numpy()[0] for k, v in next(iter(batches))[0].items()}
    table = runtimes.compare(sm, files, runners, batches, first, latency_runs=20, images=1020, views=views)
    table = table.rename(columns={"test/accuracy": "validation/accuracy"})
    print(table.to_markdown(index=False, floatfmt=".4g"))
