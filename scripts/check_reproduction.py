"""Check that the training core gives the same accuracies as before, to the last digit, on the offline data.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/check_reproduction.py [--only frozen]

Runs each case below as `python train.py ...` (seed 1) into a throw-away MLflow store, with the feature cache of
paths.cache_dir (FLOWERS_CACHE_DIR), and compares its metrics with the run of the same name in
experiments/beyond_frozen/results_round1/runs.csv, measured on 2026-11-29 with the code before the training core
was redesigned. Exits 1 if any figure differs: accuracies and epoch counts must be equal, losses equal to 1e-6
relative (float32 round-off). A cold cache first extracts the features (about 45 minutes for the
four backbones' crop views on 2 cores); fine-tuning trains through the images (about 10 minutes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "beyond_frozen" / "results_round1" / "runs.csv"
VALIDATION_IMAGES = 1020
BASE = ["experiment=beyond_frozen", "seed=1", "trainer.verbose=0"]
CASES = {
    "frozen": ["technique=frozen"],
    "four_backbones_crops_tta_refit": ["technique=multi_backbone", "model.tta=crops", "model.train_views=crops",
                                       "trainer.refit=true"],
    "finetune": ["technique=finetune"],
}
COMPARED = ["val/accuracy_best", "val/loss_at_best", "val/accuracy_tta", "test/accuracy", "test/accuracy_single_view",
            "test/top5_accuracy", "best_epoch", "epochs_trained"]
# Accuracies and epochs must be equal. A loss is a float32 mean over 1,020 images whose summation order TensorFlow
# does not fix: it may move in its 7th digit (2026-12-01: 1.425266146659851 then 1.425266265869141).
LOSS_TOLERANCE = 1e-6


def run(case: str, work: Path) -> pd.Series:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "train.py", *BASE, *CASES[case], f"tracking.artifact_location={work}/art",
               f"hydra.run.dir={work}/{case}"]
    print(f"{case}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    [latest] = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"], max_results=1,
                                  output_format="list")
    return pd.Series({"run": latest.info.run_name, **latest.data.metrics})


def _same(metric: str, before: float, now: float | None) -> bool:
    if now is None:
        return False
    if "loss" in metric:
        return abs(now - before) <= LOSS_TOLERANCE * abs(before)
    if metric == "val/accuracy_best":  # logged as Keras's float32 then, as right answers / images now
        return round(before * VALIDATION_IMAGES) == round(now * VALIDATION_IMAGES)
    return before == now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(CASES), action="append", help="run only these cases")
    args = parser.parse_args()
    if not os.environ.get("TFDS_DATA_DIR"):
        sys.exit("error: set TFDS_DATA_DIR to the prepared oxford_flowers102, e.g. ../shared/tensorflow_datasets")
    before = pd.read_csv(RESULTS).set_index("run")
    rows = []
    with tempfile.TemporaryDirectory(prefix="reproduction-") as tmp:
        for case in args.only or CASES:
            now = run(case, Path(tmp))
            then = before.loc[now["run"]]
            for metric in COMPARED:
                if pd.notna(then.get(metric)):
                    rows.append({"case": case, "metric": metric, "before": then[metric], "now": now.get(metric),
                                 "same": _same(metric, then[metric], now.get(metric))})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.16g}"))
    print("every figure is the same" if table["same"].all() else f"{(~table['same']).sum()} figures differ")
    return 0 if table["same"].all() else 1


if __name__ == "__main__":
    sys.exit(main())
