"""Model selection: the one rule that chooses between runs, for sweeps, Optuna, the registry and reports; and the
runs table they all read.

A run's score is what it is selected on: its k-fold cross-validation accuracy on train + validation when it ran
one (trainer.cv_folds), else its val accuracy at the selected epoch: on validation as it is, on the shifted
validation images, their mean, or through the model's test-time views, as it is served (trainer.select_on). Its
loss is the matching loss: the CV loss, else the selected model's negative log-likelihood on validation as it is.
Runs are ordered by score (higher first), then loss (lower first), then start time (earlier first), so that no
tie is ever broken by hand. Only runs selected on the same metric compare: no best is named among runs of
several. Test metrics play no part.
"""

from __future__ import annotations

import pandas as pd

SCORE = "selection/score"
LOSS = "selection/loss"
METRIC_TAG = "selection.metric"  # which metric the score is, e.g. cv/accuracy
# What serving a run's exported model costs, measured at export (src/export.py serving_cost).
LATENCY = "cost/latency_ms_p50"
PASSES = "cost/backbone_passes"
SIZE = "model/size_mb"
COSTS = (LATENCY, PASSES, SIZE)
# For MlflowClient.search_runs(order_by=...): the same order as `best_first`.
ORDER_BY = [f"metrics.`{SCORE}` DESC", f"metrics.`{LOSS}` ASC", "attributes.start_time ASC"]

# The configuration columns shown first; any other param that changes results and varies between the runs is
# shown after them. Runs that share every such param but the seed are one configuration.
CONFIGURATION = {"params.backbone.name": "backbone", "params.model.head": "head", "params.lr": "lr",
                 "params.batch_size": "batch_size", "params.model.dropout": "dropout",
                 "params.model.label_smoothing": "label_smoothing",
                 "params.model.augmentation.enabled": "augmentation",
                 "params.model.normalize_features": "normalize_features"}
RESULTS = {"tags.optuna.trial": "trial", f"metrics.{SCORE}": SCORE, f"metrics.{LOSS}": LOSS,
           "tags.selection.metric": "selection_metric",
           "metrics.val/accuracy_best": "val/accuracy_best", "metrics.val/accuracy_ci_low": "val/accuracy_ci_low",
           "metrics.val/accuracy_ci_high": "val/accuracy_ci_high", "metrics.val/loss_at_best": "val/loss_at_best",
           "metrics.val/accuracy_tta": "val/accuracy_tta", "metrics.val/shifted_accuracy_best": "val/shifted_accuracy",
           "metrics.val/served_accuracy_best": "val/served_accuracy",
           "metrics.cv/accuracy": "cv/accuracy", "metrics.cv/epochs": "cv/epochs",
           "metrics.refit/stage1_epochs": "refit/epochs",
           "metrics.test/accuracy": "test/accuracy", "metrics.test/accuracy_ci_low": "test/accuracy_ci_low",
           "metrics.test/accuracy_ci_high": "test/accuracy_ci_high",
           "metrics.test/mean_class_accuracy": "test/mean_class_accuracy",
           "metrics.test/accuracy_single_view": "test/accuracy_single_view",
           "metrics.shifted/val/accuracy": "shifted/val/accuracy",
           "metrics.shifted/test/accuracy": "shifted/test/accuracy",
           "metrics.test/top5_accuracy": "test/top5_accuracy",
           "metrics.best_epoch": "best_epoch", "metrics.best_C": "best_C", "metrics.epochs_trained": "epochs_trained",
           "metrics.time/train_s": "time/train_s", f"metrics.{SIZE}": SIZE, f"metrics.{LATENCY}": LATENCY,
           f"metrics.{PASSES}": PASSES, "tags.error": "error",
           "tags.git_commit": "git_commit", "tags.dataset_version": "dataset_version",
           "tags.tensorflow_version": "tensorflow", "tags.keras_version": "keras", "tags.mlflow_version": "mlflow",
           "run_id": "run_id"}
# Params that do not change what a run learns: where things are, how it is served, logged or exported.
NOT_CONFIGURATION = ("params.seed", "params.optuna_trial", "params.paths.", "params.tracking.", "params.serve.",
                     "params.registry.", "params.export.", "params.report.", "params.trainer.verbose", "params.trainer.feature_cache",
                     "params.trainer.cluster",  # the workers' addresses: trainer.strategy says what changes
                     "params.backbone.handle", "params.data.data_dir", "params.data.download", "params.data.cache",
                     "params.backbones")  # the backbone column names every backbone of a run (its tag)
INTEGERS = ("batch_size", "seed", "epochs_trained", "best_epoch", "cv/epochs", "refit/epochs", PASSES)


OBJECTIVES = {"clean": "val/accuracy_best", "shifted": "val/shifted_accuracy_best", "mean": "val/mean_accuracy_best",
              "served": "val/served_accuracy_best"}


def objective(metrics: dict[str, float], select_on: str = "clean") -> tuple[str, dict[str, float]]:
    """The name of the metric a run is selected on, and its score and loss, from the run's selection metrics.
    `select_on` (trainer.select_on) picks validation as it is, shifted, their mean, or through the test-time
    views. The loss is a negative log-likelihood without label smoothing (which would make a smoothed head lose
    every tie to an unsmoothed one): without CV the selected model's on validation as it is whatever
    `select_on`, with CV the folds' mean at the selected budget. Accuracies are right answers / images in
    float64 for either head, so the same count ties."""
    if "cv/accuracy" in metrics:
        return "cv/accuracy", {SCORE: metrics["cv/accuracy"], LOSS: metrics["cv/loss"]}
    name = OBJECTIVES[select_on]
    return name, {SCORE: metrics[name], LOSS: metrics["val/nll"]}


def mixed_metrics(metrics: pd.Series) -> str | None:
    """When the runs' selection metrics (tags.selection.metric; missing on runs logged before it) are not all one,
    what they are, e.g. "cv/accuracy: 5 runs, val/accuracy_best: 20 runs": scores on different metrics do not
    compare (a CV score is of models fitted on more images than a val score), so no run is best of them all."""
    counts = metrics.fillna("no selection.metric tag").value_counts()
    return ", ".join(f"{name}: {n} run{'s' * (n > 1)}" for name, n in counts.items()) if len(counts) > 1 else None


def best_first(runs: pd.DataFrame) -> pd.DataFrame:
    """`mlflow.search_runs` output (metrics.*, start_time columns) in the selection order; runs without a score
    last."""
    runs = runs.assign(**{f"metrics.{SCORE}": runs.get(f"metrics.{SCORE}"), f"metrics.{LOSS}": runs.get(f"metrics.{LOSS}")})
    return runs.sort_values([f"metrics.{SCORE}", f"metrics.{LOSS}", "start_time"], ascending=[False, True, True],
                            na_position="last", ignore_index=True)


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """`mlflow.search_runs` output -> one row per run, best first: run, status, configuration (CONFIGURATION
    and any other param that varies), seed, then the results and provenance (RESULTS)."""
    runs = best_first(runs)
    if "tags.backbone" in runs:  # `a+b` for a run on several backbones (params.backbone.name is then unused)
        runs = runs.assign(**{"params.backbone.name": runs["tags.backbone"].fillna(runs["params.backbone.name"])})
    varying = sorted(c for c in runs if c.startswith("params.") and c not in CONFIGURATION  # sorted: same order
                     and not c.startswith(NOT_CONFIGURATION) and runs[c].nunique(dropna=False) > 1)  # every report
    columns = {"tags.mlflow.runName": "run", "status": "status", **CONFIGURATION,
               **{c: c.removeprefix("params.") for c in varying}, "params.seed": "seed", **RESULTS}
    table = runs.reindex(columns=list(columns)).rename(columns=columns)
    for column in ("lr", "dropout", "label_smoothing", *INTEGERS):
        table[column] = _number(table[column], integer=column in INTEGERS)
    return with_tta_gain(table)


def with_tta_gain(table: pd.DataFrame) -> pd.DataFrame:
    """The runs table with `test/tta_gain`, what a run's test-time views add to its own one-view accuracy (the
    same images), after `test/accuracy_single_view`; a table that has it already is returned as it is."""
    if "test/tta_gain" in table:
        return table
    table = table.copy()
    table.insert(table.columns.get_loc("test/accuracy_single_view") + 1, "test/tta_gain",
                 table["test/accuracy"] - table["test/accuracy_single_view"])
    return table


def _number(values: pd.Series, integer: bool) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers.astype("Int64") if integer and (numbers.dropna() % 1 == 0).all() else numbers


def configuration_columns(table: pd.DataFrame) -> list[str]:
    return list(table.columns[table.columns.get_loc("status") + 1: table.columns.get_loc("seed")])


def finished(table: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished with a score, best first."""
    return table[(table["status"] == "FINISHED") & table[SCORE].notna()]


def markdown(table: pd.DataFrame, configuration: list[str]) -> str:
    """The table in markdown, without empty columns; configuration values shared by every row are named in a
    line above it instead of repeated in columns."""
    table = table.dropna(axis=1, how="all")
    fixed = [c for c in configuration if c in table and table[c].nunique(dropna=False) == 1 and len(table) > 1]
    text = f"Same in every row: {', '.join(f'{c} {table[c].iloc[0]}' for c in fixed)}.\n\n" if fixed else ""
    shown = table.drop(columns=fixed).astype(object)
    return text + shown.where(shown.notna(), "").to_markdown(index=False, floatfmt=".4g") + "\n"
