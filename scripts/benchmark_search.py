"""Benchmark the Optuna search on mobilenet_v2_100_224 with the offline data, and print its figures.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/benchmark_search.py

1. The search itself: `python train.py -m hparams_search=mobilenet_v2` (lr, batch_size, dropout; 20 trials on
   cached features; the first trial extracts them). Wall time, trials pruned, best val and test accuracy.
2. Cached against uncached, side by side in this run: the same seeded sampler gives both studies the same
   first trials; each trial trains a fixed number of epochs with no pruning, once on cached features and
   once end to end through the backbone. Per-trial time ratio, and val accuracy of each pair.
3. A single default run, `python train.py backbone=mobilenet_v2_100_224` (on the cached features).

Everything is written to a fresh folder (MLflow store, Optuna storage, feature cache), printed at the end.
Selection is on validation only; test accuracy is reported, never used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd

from src import cli

ROOT = Path(__file__).resolve().parents[1]


def run(work: Path, *overrides: str) -> float:
    """`python train.py ...` with the benchmark's stores; returns the wall time in seconds."""
    env = cli.benchmark_env(work)
    start = time.perf_counter()
    with open(work / "log.txt", "a") as log:
        subprocess.run([sys.executable, "train.py", *overrides, "trainer.verbose=0",
                        f"hydra.run.dir={work}/outputs/run", f"hydra.sweep.dir={work}/outputs/{len(os.listdir(work))}"],
                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def study_runs(work: Path, study: str) -> pd.DataFrame:
    """The study's trial runs, one row per trial, with their duration in seconds."""
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`optuna.study` = '{study}'")
    runs = runs[runs["tags.optuna.trial"].notna()].copy()
    runs["trial"] = runs["tags.optuna.trial"].astype(int)
    runs["seconds"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds()
    return runs.set_index("trial").sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--compare-trials", type=int, default=3, help="trials run both cached and uncached")
    parser.add_argument("--compare-epochs", type=int, default=10, help="fixed epochs of each compared trial")
    parser.add_argument("--skip-default", action="store_true", help="skip the single default run")
    args = parser.parse_args()
    work = cli.benchmark_folder("benchmark-search-")
    storage = f"hydra.sweeper.storage=sqlite:///{work}/optuna.db"

    search_seconds = run(work, "-m", "hparams_search=mobilenet_v2", storage, "hydra.sweeper.study_name=search",
                         f"hydra.sweeper.n_trials={args.trials}")
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{work}/optuna.db")
    search = study_runs(work, "search")
    best = search.loc[study.best_trial.number]

    fixed = ["-m", "hparams_search=mobilenet_v2", storage, f"hydra.sweeper.n_trials={args.compare_trials}",
             f"epochs={args.compare_epochs}", f"trainer.early_stopping.patience={args.compare_epochs}",
             "hydra.sweeper.pruner.name=NopPruner", "~hydra.sweeper.pruner.n_startup_trials",
             "~hydra.sweeper.pruner.n_warmup_steps"]
    run(work, *fixed, "hydra.sweeper.study_name=compare_cached")
    run(work, *fixed, "hydra.sweeper.study_name=compare_uncached", "trainer.feature_cache=false")
    cached, uncached = study_runs(work, "compare_cached"), study_runs(work, "compare_uncached")
    pairs = cached[["params.lr", "params.batch_size", "params.model.dropout"]].copy()
    pairs["cached_s"], pairs["uncached_s"] = cached["seconds"], uncached["seconds"]
    pairs["ratio"] = pairs["uncached_s"] / pairs["cached_s"]
    pairs["cached_val"] = cached["metrics.val/accuracy_best"]
    pairs["uncached_val"] = uncached["metrics.val/accuracy_best"]
    pairs["val_diff_points"] = 100 * (pairs["cached_val"] - pairs["uncached_val"]).abs()
    same_params = (cached["params.lr"] == uncached["params.lr"]).all()

    print("\n== Optuna search, mobilenet_v2_100_224, cached features ==")
    states = [t.state.name for t in study.trials]
    print(f"trials: {len(states)} ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed); wall time {search_seconds:.0f} s")
    print(f"first trial (extracts train/validation/test features): {search['seconds'].iloc[0]:.0f} s; "
          f"later trials: median {search['seconds'].iloc[1:].median():.1f} s")
    print(f"best trial {study.best_trial.number}: {study.best_trial.params}")
    print(f"  val accuracy {best['metrics.val/accuracy_best']:.4f}, test accuracy {best['metrics.test/accuracy']:.4f}, "
          f"test top-5 {best['metrics.test/top5_accuracy']:.4f}")

    print(f"\n== Cached vs uncached, the same {args.compare_trials} trials, {args.compare_epochs} epochs each ==")
    print(f"same sampled parameters in both studies: {same_params}")
    print(pairs.to_string(float_format=lambda v: f"{v:.4g}"))
    ratio = statistics.mean(pairs["ratio"])
    print(f"per-trial time ratio uncached/cached: {ratio:.1f}x (mean); "
          f"max val accuracy difference {pairs['val_diff_points'].max():.2f} points")
    print(f"projected uncached {args.trials}-trial search at this ratio: "
          f"{search['seconds'].iloc[1:].mean() * ratio * args.trials / 60:.0f} min "
          f"(cached: {search_seconds / 60:.1f} min measured)")

    if not args.skip_default:
        default_seconds = run(work, "backbone=mobilenet_v2_100_224")
        mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
        runs = mlflow.search_runs(search_all_experiments=True)
        default = runs[runs["tags.mlflow.parentRunId"].isna() & runs["tags.sweep"].isna()].iloc[0]
        print("\n== Single default run (cached features) ==")
        print(f"val accuracy {default['metrics.val/accuracy_best']:.4f}, test accuracy "
              f"{default['metrics.test/accuracy']:.4f}; wall time {default_seconds:.0f} s")
        print(f"search best minus default: val {100 * (best['metrics.val/accuracy_best'] - default['metrics.val/accuracy_best']):+.1f} "
              f"points, test {100 * (best['metrics.test/accuracy'] - default['metrics.test/accuracy']):+.1f} points")


if __name__ == "__main__":
    main()
