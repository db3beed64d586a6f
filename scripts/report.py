"""Tables and figures of one experiment's runs, from MLflow, into experiments/<name>/results and a `report` run.

    python scripts/report.py backbone_comparison          # or: make report EXPERIMENT=backbone_comparison
    python scripts/report.py optuna_search --optuna-storage postgresql://user:password@host/db
    python scripts/report.py beyond_frozen --from-runs experiments/beyond_frozen/results/runs.csv
    python scripts/report.py beyond_frozen --from-comparisons DIR/comparisons.csv --out DIR
    python scripts/report.py beyond_frozen --out DIR --baseline model.head=logistic_regression --same backbone trainer.refit

The experiment is an MLflow experiment, usually made by `python train.py -m experiment=<name>`. The store is
MLFLOW_TRACKING_URI or the project's mlflow.db. The folder's previous results are replaced. With --from-runs,
only the summary is written again, from an earlier report's runs.csv, and no store is read; with
--from-comparisons, only the comparisons, from an earlier report's comparisons.csv, with the rows over seeds and
Holm's adjusted p-values.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mlflow

from src import cli, report
from src.config import PROJECT_ROOT


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="MLflow experiment name, e.g. backbone_comparison")
    parser.add_argument("--out", type=Path, help="output folder (default: experiments/<experiment>/results)")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="the study's storage, when its logged URL has no password or has moved")
    parser.add_argument("--baseline", nargs="+", metavar="PARAM=VALUE",
                        help="compare with these runs instead of the config's report.baseline, e.g. "
                             "model.head=logistic_regression")
    parser.add_argument("--same", nargs="+", default=[], metavar="COLUMN",
                        help="with --baseline: the columns a configuration shares with its baseline, e.g. backbone")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-runs", type=Path, metavar="CSV",
                        help="write summary.csv/.md again from this runs.csv, without the MLflow store")
    source.add_argument("--from-comparisons", type=Path, metavar="CSV",
                        help="write comparisons.csv/.md again from this comparisons.csv, with the rows over seeds "
                             "and Holm's adjusted p-values, without the MLflow store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or PROJECT_ROOT / "experiments" / args.experiment / "results"
    if args.from_runs:
        files = report.write_summary(args.from_runs, out)
        print(f"summary of {args.from_runs} in {out}: {', '.join(files)}")
        return 0
    if args.from_comparisons:
        files = report.write_comparisons(args.from_comparisons, out)
        print(f"comparisons of {args.from_comparisons} in {out}: {', '.join(files)}")
        return 0
    cli.config()
    baseline = report.declared_baseline(args.baseline, args.same) if args.baseline else None
    files = report.write_report(mlflow.MlflowClient(), args.experiment, out, args.optuna_storage, baseline)
    print(f"report of '{args.experiment}' in {out} (and logged to its `report` run): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
