"""Register the best run's model in the MLflow Model Registry and make it the champion if it beats the current one.

    python scripts/register_best.py                       # best run of the experiment (tracking.experiment_name)
    python scripts/register_best.py --sweep <parent run id>   # best job of one sweep
    python scripts/register_best.py --run-id <run id>     # this run

Best = first in the selection order of src/selection.py (CV or val accuracy, then the matching loss, then the
earlier run). The store is MLFLOW_TRACKING_URI or the project's mlflow.db. The `champion` alias moves only when
the new version beats it on what both were selected on.
"""

from __future__ import annotations

import argparse
import sys

import mlflow

from src import cli, register


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=cfg.tracking.experiment_name, help="MLflow experiment to search")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--sweep", metavar="RUN_ID", help="only the jobs of this sweep (its parent run id)")
    scope.add_argument("--run-id", help="register this run instead of the best one")
    parser.add_argument("--name", default=cfg.registry.model_name, help="registered model name")
    args = parser.parse_args(argv)
    outcome = register.register_best(mlflow.MlflowClient(), args.experiment, args.name,
                                     sweep_run_id=args.sweep, run_id=args.run_id)
    print(outcome.message)
    print(f"serve it: make serve-best   (models:/{args.name}@{register.CHAMPION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
