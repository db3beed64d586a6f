"""Registry: register the best run's model in the MLflow Model Registry and point the `champion` alias at it.

The best run is the first finished run in the selection order (src/selection.py). Test metrics are recorded on
the model version, never used to choose it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD

from src import selection, track
from src.config import UserError

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_TAG = "selection_score"
# Run metric or tag -> model version tag; a run logged before a metric existed gets no tag for it.
VERSION_METRICS = {selection.SCORE: SCORE_TAG, selection.LOSS: "selection_loss",
                   "val/accuracy_best": "val_accuracy", "test/accuracy": "test_accuracy",
                   "test/accuracy_ci_low": "test_accuracy_ci_low", "test/accuracy_ci_high": "test_accuracy_ci_high",
                   "test/top5_accuracy": "test_top5_accuracy",
                   **{cost: cost for cost in selection.COSTS}}
# A cost that register-best can limit -> its unit, and what the run lowest on it is called.
LIMITED_COSTS = {selection.LATENCY: ("ms", "fastest"), selection.SIZE: ("MB", "smallest")}
VERSION_RUN_TAGS = {"backbone": "backbone", "dataset": "dataset", "dataset_version": "data_version",
                    "validation_split": "validation_split", selection.METRIC_TAG: "selection_metric",
                    "git_commit": "git_commit"}


@dataclass
class Outcome:
    version: ModelVersion   # the version of the chosen run
    champion: ModelVersion  # the champion after this call
    message: str


def best_run(client: mlflow.MlflowClient, experiment_name: str, sweep_run_id: str | None = None,
             limits: dict[str, float] | None = None, selection_metric: str | None = None) -> Run:
    """The best finished run of the experiment, or of one sweep's jobs; with `limits` (a LIMITED_COSTS metric ->
    its maximum), the best of the runs within them. The runs must have been selected on one metric, or
    `selection_metric` names the one to choose among."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise UserError(f"no MLflow experiment '{experiment_name}' in {mlflow.get_tracking_uri()}; "
                        "train first (make train) or pass --experiment")
    where = ["attributes.status = 'FINISHED'", f"metrics.`{selection.SCORE}` >= 0"]
    if sweep_run_id:
        _get_run(client, sweep_run_id)
        where.append(f"tags.mlflow.parentRunId = '{sweep_run_id}'")
    if selection_metric:
        where.append(f"tags.`{selection.METRIC_TAG}` = '{selection_metric}'")

    def search(conditions: list[str], limit: int) -> list[Run]:
        return client.search_runs([experiment.experiment_id], " and ".join(conditions), max_results=limit,
                                  order_by=selection.ORDER_BY)

    runs = search(where, SEARCH_MAX_RESULTS_THRESHOLD if limits else 1)
    scope = f"sweep {sweep_run_id}" if sweep_run_id else f"experiment '{experiment_name}'"
    if not runs:
        chosen = f" selected on {selection_metric}" if selection_metric else ""
        raise UserError(f"no finished run{chosen} with {selection.SCORE} in {scope}; train first (make train)")
    metric = runs[0].data.tags.get(selection.METRIC_TAG)
    other = f"tags.`{selection.METRIC_TAG}` != '{metric}'" if metric else f"tags.`{selection.METRIC_TAG}` LIKE '%'"
    if search([*where, other], 1):  # only then every run, to name their metrics
        every = search(where, SEARCH_MAX_RESULTS_THRESHOLD)
        mixed = selection.mixed_metrics(pd.Series([run.data.tags.get(selection.METRIC_TAG) for run in every]))
        raise UserError(f"the finished runs in {scope} were selected on different metrics ({mixed}), whose scores "
                        "do not compare; choose among one: --selection-metric <metric>")
    return _within_limits(runs, limits) if limits else runs[0]


def _within_limits(runs: list[Run], limits: dict[str, float]) -> Run:
    """The first of `runs` (best first) whose costs are all within `limits`. A run without one of the limited
    metrics (logged before it was measured) is left out."""
    for metric in limits:
        missing = sum(metric not in run.data.metrics for run in runs)
        if missing:
            log.warning("%d of %d runs have no %s (logged before it was measured): left out", missing, len(runs),
                        metric)
    measured = [run for run in runs if all(metric in run.data.metrics for metric in limits)]
    within = [run for run in measured if all(run.data.metrics[m] <= limit for m, limit in limits.items())]
    if within:
        return within[0]
    asked = " and ".join(f"{metric} <= {limit:g} {LIMITED_COSTS[metric][0]}" for metric, limit in limits.items())
    if not measured:
        raise UserError(f"no run has {' and '.join(limits)} (all were logged before it was measured); "
                        "train again, or drop the limit")
    lowest = []
    for metric in limits:
        run = min(measured, key=lambda r: r.data.metrics[metric])
        figures = " and ".join(f"{run.data.metrics[m]:.1f} {LIMITED_COSTS[m][0]}" for m in limits)
        lowest.append(f"the {LIMITED_COSTS[metric][1]}, run {run.info.run_name} ({run.info.run_id}), has {figures}")
    raise UserError(f"no run is within {asked}: {'; '.join(lowest)}; raise the limit, or train a cheaper model "
                    "(fewer backbones or test-time views)")


def champion(client: mlflow.MlflowClient, name: str) -> ModelVersion | None:
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return client.get_model_version(name, version) if version else None


def require_champion(client: mlflow.MlflowClient, name: str) -> ModelVersion:
    version = champion(client, name)
    if version is None:
        raise UserError(f"model '{name}' has no {CHAMPION} in {mlflow.get_tracking_uri()}; "
                        "train, then run make register-best")
    return version


def register_run(client: mlflow.MlflowClient, run: Run, name: str, limits: dict[str, float] | None = None) -> Outcome:
    """Register `run`'s model under `name` (once per run) and move `champion` to it if it beats the
    current champion on the same validation data, or if the champion is over one of `limits` (its cost tags);
    otherwise leave the alias where it is."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run.info.run_id}' and name = 'model'")
    if not models:
        raise UserError(f"run {run.info.run_id} has no logged model 'model'; it did not finish exporting")
    with track.store_lock(mlflow.get_tracking_uri()):  # one compare-and-set at a time (SQLite, PostgreSQL)
        registered = _version_of(client, name, run) or mlflow.register_model(
            f"models:/{models[0].model_id}", name, tags=_version_tags(run))
        version = client.get_model_version(name, str(registered.version))
        current = champion(client, name)
        label = f"{name} version {version.version}"
        if current is not None and str(current.version) == str(version.version):
            return Outcome(version, current, f"{label} (run {run.info.run_id}) is already the {CHAMPION}")
        over = _over_limits(current, limits or {}) if current is not None else []
        if current is not None and not over:
            held = f"the {CHAMPION}, version {current.version}"
            if SCORE_TAG not in current.tags:
                return Outcome(version, current, f"{label} ({_score(version)}): {held} has no {SCORE_TAG} "
                                                 "tag to compare with; the alias stays (move it by hand)")
            if _validation(version) != _validation(current):
                return Outcome(version, current,
                               f"{label} was validated on {_validation(version)}, {held} on "
                               f"{_validation(current)}: they do not compare; the alias stays (move it by hand)")
            if _key(version) <= _key(current):
                return Outcome(version, current, f"{label} ({_score(version)}) does not beat {held} "
                                                 f"({_score(current)}); the alias stays")
        client.set_registered_model_alias(name, CHAMPION, version.version)
    was = f"; it was version {current.version} ({_score(current)})" if current else ""
    was += f", over the limit: {', '.join(over)}" if over else ""
    return Outcome(version, champion(client, name), f"{label} ({_score(version)}) is now the {CHAMPION}{was}")


def register_best(client: mlflow.MlflowClient, experiment_name: str, name: str, sweep_run_id: str | None = None,
                  run_id: str | None = None, limits: dict[str, float] | None = None,
                  selection_metric: str | None = None) -> Outcome:
    if run_id and limits:
        raise UserError("--run-id registers that run whatever it costs; drop --max-latency-ms and --max-size-mb")
    if run_id and selection_metric:
        raise UserError("--run-id registers that run; drop --selection-metric")
    run = (_get_run(client, run_id) if run_id
           else best_run(client, experiment_name, sweep_run_id, limits, selection_metric))
    if selection.SCORE not in run.data.metrics or run.info.status != "FINISHED":
        raise UserError(f"run {run.info.run_id} is {run.info.status} without {selection.SCORE}; pick a finished run")
    return register_run(client, run, name, limits)


def _over_limits(version: ModelVersion, limits: dict[str, float]) -> list[str]:
    """The limits a registered version is not within, from its cost tags; a version without the tag is over."""
    over = []
    for metric, limit in limits.items():
        value = version.tags.get(VERSION_METRICS[metric])
        shown = "not measured" if value is None else f"{float(value):.1f} {LIMITED_COSTS[metric][0]}"
        if value is None or float(value) > limit:
            over.append(f"{metric} {shown} > {limit:g}")
    return over


def _get_run(client: mlflow.MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id} in {mlflow.get_tracking_uri()}; check the run id in the MLflow UI") from None


def _version_of(client: mlflow.MlflowClient, name: str, run: Run) -> ModelVersion | None:
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _version_tags(run: Run) -> dict[str, str]:
    tags = {tag: repr(run.data.metrics[metric]) for metric, tag in VERSION_METRICS.items()
            if metric in run.data.metrics}
    tags |= {tag: run.data.tags[key] for key, tag in VERSION_RUN_TAGS.items() if key in run.data.tags}
    return tags | {"run_id": run.info.run_id, "run_name": run.info.run_name}


def _key(version: ModelVersion) -> tuple[float, float]:
    """Higher is better: the selection score, then the lower selection loss (src/selection.py)."""
    return float(version.tags[SCORE_TAG]), -float(version.tags.get("selection_loss", "inf"))


def _validation(version: ModelVersion) -> str:
    """What a version was selected on: the dataset, its version and validation split, and the selection metric."""
    tags = version.tags
    return "/".join(tags.get(key, "?") for key in ("dataset", "data_version", "validation_split", "selection_metric"))


def _score(version: ModelVersion) -> str:
    return f"{version.tags.get('selection_metric', 'score')} {float(version.tags[SCORE_TAG]):.4f}"
