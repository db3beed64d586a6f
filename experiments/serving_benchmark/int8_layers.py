"""Where full int8 loses the champion's answers: TensorFlow's QuantizationDebugger ranks the int8 model's layers
by RMSE / scale on the 200 train images that calibrate it, then int8 models that keep the worst N layers (and
those over the TF guide's 0.7, and every layer of the head) in float are compared with the SavedModel on
validation, over the model's views.

    python experiments/serving_benchmark/int8_layers.py /tmp/int8/probe 3 10   # the champion of the store in use

Output of 2026-12-06: int8_study.md (before the int8_head_float variant); of 2026-12-07: the sixth round in
README.md."""
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from src import runtimes
from src.data import load_splits, make_batches
from src.export import CLASSIFY_RESIZED, saved_model_of
from src.track import run_config
from src.views import parse_views

client = mlflow.MlflowClient()
uri, run_id, _ = runtimes.resolve_model(client, None, "flowers")
cfg = run_config(run_id)
splits = load_splits(cfg.data)
views = parse_views(cfg.model.tta, "model.tta")
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    sm = saved_model_of(uri, Path(tmp))
    sizes = runtimes.input_sizes(sm)
    calibration = runtimes.calibration_images(splits.train, sizes, runtimes.REPRESENTATIVE, cfg.seed)
    count = len(next(iter(calibration.values())))

    def dataset():
        return ({name: images[i][None] for name, images in calibration.items()} for i in range(count))

    def listed():
        return ([images[i][None] for images in calibration.values()] for i in range(count))

    def converter():
        c = tf.lite.TFLiteConverter.from_saved_model(str(sm), signature_keys=[CLASSIFY_RESIZED])
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = dataset
        return c

    t = time.time()
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter(), debug_dataset=listed)
    debugger.run()
    with open(out / "layer_stats.csv", "w") as f:
        debugger.layer_statistics_dump(f)
    stats = pd.read_csv(out / "layer_stats.csv")
    stats["rmse/scale"] = np.sqrt(stats["mean_squared_error"]) / stats["scale"]
    stats = stats.sort_values("rmse/scale", ascending=False)
    stats.to_csv(out / "layer_stats.csv", index=False)
    print(f"debugger {time.time() - t:.0f} s, {len(stats)} layers")
    print(stats[["op_name", "tensor_name", "rmse/scale", "scale"]].head(25).to_string())
    variants = {"int8_plain": []}
    for n in [int(a) for a in sys.argv[2:]]:
        variants[f"int8_top{n}"] = list(stats["tensor_name"].head(n))
    variants["int8_over0.7"] = list(stats[stats["rmse/scale"] > 0.7]["tensor_name"])
    variants["int8_head_float"] = list(stats[stats["tensor_name"].str.startswith("head")]["tensor_name"])
    files, runners = {}, {}
    for name, nodes in variants.items():
        t = time.time()
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        model = tf.lite.experimental.QuantizationDebugger(converter=converter(), debug_dataset=listed,
                                                           debug_options=options).get_nondebug_quantized_model()
        (out / f"{name}.tflite").write_bytes(model)
        files[name] = [out / f"{name}.tflite"]
        runners[name] = runtimes.Classifier(out / f"{name}.tflite")
        print(name, len(nodes), f"{time.time() - t:.0f} s")
    batches = make_batches(splits.validation, sizes, 32)
    first = {k: v.numpy()[0] for k, v in next(iter(batches))[0].items()}
    table = runtimes.compare(sm, files, runners, batches, first, latency_runs=20, images=1020, views=views,
                             split="validation")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    table.to_csv(out / "validation.csv", index=False)
