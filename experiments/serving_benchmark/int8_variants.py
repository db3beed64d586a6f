"""Two more int8 variants of the champion on validation: 16x8 (int16 activations, int8 weights, float ops where
16x8 has no kernel) and full int8 calibrated on 1,000 train images instead of 200.

    python experiments/serving_benchmark/int8_variants.py /tmp/int8/probe2

Output of 2026-12-06: int8_study.md."""
import sys
import tempfile
import time
from pathlib import Path

import mlflow
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

    def calib(n):
        c = next(iter(make_batches(splits.train, sizes, n, shuffle_seed=cfg.seed)))[0]
        return {name: images.numpy() for name, images in c.items()}

    files, runners = {}, {}
    int16x8 = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
               tf.lite.OpsSet.TFLITE_BUILTINS]
    for name, n, ops in [("int16x8", 200, int16x8), ("int8_calib1000", 1000, [tf.lite.OpsSet.TFLITE_BUILTINS_INT8])]:
        t = time.time()
        rep = calib(n)
        c = tf.lite.TFLiteConverter.from_saved_model(str(sm), signature_keys=[CLASSIFY_RESIZED])
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda rep=rep, n=n: ({k: v[i][None] for k, v in rep.items()} for i in range(n))
        c.target_spec.supported_ops = ops
        (out / f"{name}.tflite").write_bytes(c.convert())
        files[name] = [out / f"{name}.tflite"]
        runners[name] = runtimes.Classifier(out / f"{name}.tflite")
        print(name, f"{time.time() - t:.0f} s", flush=True)
    batches = make_batches(splits.validation, sizes, 32)
    first = {k: v.numpy()[0] for k, v in next(iter(batches))[0].items()}
    table = runtimes.compare(sm, files, runners, batches, first, latency_runs=20, images=1020, views=views,
                             split="validation")
    print(table.to_markdown(index=False, floatfmt=".4g"))
