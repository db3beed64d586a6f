"""Register the best run's model in the MLflow Model Registry and make it the champion if it beats the current one.

    python scripts/register_best.py                       # best run of the experiment (tracking.experiment_name)
    python scripts/register_best.py --sweep <parent run id>   # best job of one sweep
    python scripts/register_best.py --run-id <run id>     # this run
    python scripts/register_best.py --max-latency-ms 30 --max-size-mb 50   # the best run within these costs
    python scripts/register_best.py --selection-metric cv/accuracy    # among the runs selected on this metric

Best = first in the selection order of src/selection.py (CV or val accuracy, then the matching loss, then the
earlier run); with limits, among the runs within them (the costs each run logged at export). Only runs selected
on the same metric compare: when the runs in scope were selected on several (a CV score and a val score, say),
it names them and registers nothing until --selection-metric picks one. The store is
MLFLOW_TRACKING_URI or the project's mlflow.db. The `champion` alias moves when the new version beats it on what
both were selected on, or, with limits, when the champion is over one of them.
"""

from __future__ import annotations

import argparse
import logging
import sys

import mlflow

from src import cli, register, selection


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=cfg.tracking.experiment_name, help="MLflow experiment to search")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--sweep", metavar="RUN_ID", help="only the jobs of this sweep (its parent run id)")
    scope.add_argument("--run-id", help="register this run instead of the best one")
    parser.add_argument("--name", default=cfg.registry.model_name, help="registered model name")
    parser.add_argument("--max-latency-ms", type=float, help=f"only runs whose {selection.LATENCY} is at most this")
    parser.add_argument("--max-size-mb", type=float, help=f"only runs whose {selection.SIZE} is at most this")
    parser.add_argument("--selection-metric", metavar="METRIC",
                        help=f"only runs selected on this metric (their {selection.METRIC_TAG} tag), e.g. cv/accuracy")
    args = parser.parse_args(argv)
    limits = {metric: limit for metric, limit in ((selection.LATENCY, args.max_latency_ms),
                                                  (selection.SIZE, args.max_size_mb)) if limit is not None}
    logging.basicConfig(level=logging.WARNING)
    outcome = register.register_best(mlflow.MlflowClient(), args.experiment, args.name,
                                     sweep_run_id=args.sweep, run_id=args.run_id, limits=limits,
                                     selection_metric=args.selection_metric)
    print(outcome.message)
    print(f"serve it: make serve-best   (models:/{args.name}@{register.CHAMPION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
