"""Sweeps: one MLflow parent run per `python train.py -m ...`, its jobs as child runs, and a summary.

A Hydra callback opens the parent run when the multirun starts and hands its id to the jobs through the
environment (jobs may run in other processes, e.g. with the joblib launcher). When the multirun ends it
writes the summary: a table of every job (CSV and markdown) and the best job, chosen by src/selection.py (none
when the jobs were selected on different metrics).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src import register, selection, track
from src.config import UserError
from src.track import SWEEP_RUN_ENV

log = logging.getLogger(__name__)

SWEEP_JOBS_ENV = "FLOWERS_SWEEP_JOBS"


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.trainer.strategy == "multi_worker":  # each worker would start a sweep run of its own
            sys.exit("error: trainer.strategy=multi_worker trains one job per command; start each worker without -m")
        experiment_id = track.setup(config.tracking)
        sweep_dir = config.hydra.sweep.dir
        run = mlflow.MlflowClient().create_run(
            experiment_id, run_name=f"sweep-{Path(sweep_dir).name}",
            tags={"sweep": "true", "sweep.dir": sweep_dir, "sweep.overrides": " ".join(config.hydra.overrides.task),
                  "git_commit": track.git_commit()})
        os.environ[SWEEP_RUN_ENV] = run.info.run_id
        log.info("MLflow sweep run %s in %s", run.info.run_id, config.tracking.uri)
        jobs = grid_size(config)
        if jobs:
            os.environ[SWEEP_JOBS_ENV] = str(jobs)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Progress of a grid: "job 3/8" and the job's overrides (jobs may run in other processes)."""
        if SWEEP_JOBS_ENV in os.environ and config.hydra.job.get("num") is not None:
            log.info("job %d/%s: %s", config.hydra.job.num + 1, os.environ[SWEEP_JOBS_ENV],
                     " ".join(config.hydra.overrides.task))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        run_id = os.environ.get(SWEEP_RUN_ENV)
        end_sweep("FINISHED")
        if run_id and config.registry.register_after_sweep:
            try:
                outcome = register.register_best(mlflow.MlflowClient(), config.tracking.experiment_name,
                                                 config.registry.model_name, sweep_run_id=run_id)
            except UserError as error:  # the sweep's runs are complete; only the registration is missing
                log.error("registry.register_after_sweep: %s", error)
                return
            log.info(outcome.message)


def grid_size(config: DictConfig) -> int | None:
    """How many jobs a grid sweep (Hydra's basic sweeper) runs: its params, replaced key by key by the command line.
    None for other sweepers (the Optuna sweeper counts its own trials)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(
        [*params, *config.hydra.overrides.task])}
    return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in overrides.values())


def end_sweep(status: str) -> None:
    """Summarise the sweep's run, whose id on_multirun_start left in the environment, and end it."""
    run_id = os.environ.pop(SWEEP_RUN_ENV, None)
    os.environ.pop(SWEEP_JOBS_ENV, None)
    if run_id is None:
        return
    table = summarize(run_id)
    log.info("sweep %s: %d jobs, %d failed; summary logged to the sweep run", run_id, len(table),
             (table["status"] == "FAILED").sum())
    mlflow.MlflowClient().set_terminated(run_id, status)


def job_table(parent_run_id: str) -> pd.DataFrame:
    """One row per child run of the sweep, best first."""
    return selection.runs_table(mlflow.search_runs(search_all_experiments=True,
                                                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"))


def summarize(parent_run_id: str) -> pd.DataFrame:
    """Log the job table and the best job to the parent run; return the table."""
    client = mlflow.MlflowClient()
    table = job_table(parent_run_id)
    finished = selection.finished(table)
    mixed = selection.mixed_metrics(finished["selection_metric"])
    note = f"The jobs were selected on different metrics ({mixed}), whose scores do not compare.\n\n" if mixed else ""
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "summary.csv", index=False)
        (Path(tmp) / "summary.md").write_text(note + selection.markdown(table.drop(columns=["run_id"]),
                                                                              selection.configuration_columns(table)))
        client.log_artifact(parent_run_id, str(Path(tmp) / "summary.csv"))
        client.log_artifact(parent_run_id, str(Path(tmp) / "summary.md"))
    client.log_metric(parent_run_id, "jobs", len(table))
    client.log_metric(parent_run_id, "jobs_failed", int((table["status"] == "FAILED").sum()))
    if mixed:
        log.warning("the jobs were selected on different metrics (%s), whose scores do not compare: no best job; "
                    "register one with make register-best ARGS=\"--sweep %s --selection-metric <metric>\"",
                    mixed, parent_run_id)
    elif len(finished):
        best = finished.iloc[0]
        client.set_tag(parent_run_id, "best_run_id", best["run_id"])
        client.set_tag(parent_run_id, "best_run_name", best["run"])
        client.set_tag(parent_run_id, selection.METRIC_TAG, best["selection_metric"])
        for metric in (selection.SCORE, "test/accuracy", "test/top5_accuracy"):
            client.log_metric(parent_run_id, f"best/{metric}", float(best[metric]))
    return table
