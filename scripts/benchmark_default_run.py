"""Time the default run, `python train.py backbone=mobilenet_v2_100_224`, with a cold and then a warm feature cache.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/benchmark_default_run.py

Runs the command twice, each in its own process, into a throw-away folder (MLflow store, artifacts, feature
cache, Hydra outputs): first with the cache empty, so the run extracts the backbone's features of every split,
then again, so it reads them. Prints each run's wall time (process start to exit, TensorFlow's import
included) and its val and test accuracy, the test accuracy with its 95 % bootstrap interval over the test images,
read from its MLflow run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from src import cli

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["train.py", "backbone=mobilenet_v2_100_224"]


def timed_run(work: Path, name: str, overrides: list[str]) -> tuple[float, mlflow.entities.Run]:
    """One `python train.py ...` into the store under `work`: its wall time in seconds, and its MLflow run."""
    env = cli.benchmark_env(work)
    command = [sys.executable, *COMMAND, *overrides, f"tracking.artifact_location={work}/artifacts",
               f"hydra.run.dir={work}/outputs/{name}"]
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: the {name} run failed (exit code {done.returncode}); its output: {work / f'{name}.log'}")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    [run] = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"], max_results=1,
                               output_format="list")
    return seconds, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. trainer.verbose=2")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away folder (its path is printed)")
    args = parser.parse_args()
    work = cli.benchmark_folder("benchmark-default-")
    results = {name: timed_run(work, name, args.overrides) for name in ("cold", "warm")}

    print(f"\n== python {' '.join(COMMAND + args.overrides)} ==")
    for name, (seconds, run) in results.items():
        metrics = run.data.metrics
        print(f"{name} cache: {seconds:6.1f} s wall ({seconds / 60:.1f} min); val accuracy "
              f"{metrics['val/accuracy_best']:.4f}, test accuracy {metrics['test/accuracy']:.4f} "
              f"[{metrics['test/accuracy_ci_low']:.4f}, {metrics['test/accuracy_ci_high']:.4f}] "
              f"(feature cache: {run.data.tags.get('feature_cache')}, epochs trained {metrics['epochs_trained']:.0f})")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
