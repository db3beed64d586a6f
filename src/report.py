"""Reports: an MLflow experiment's runs -> a table, a per-configuration summary and figures, written to a
folder (experiments/<name>/results) and logged to a `report` run of the same experiment.

The best run is the first finished run of the table, which is sorted on validation (highest
val/accuracy_best, ties to the lower val/loss_at_best), as sweeps and the registry choose. Its test confusions
and mistakes are drawn, never used to choose.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import sqlalchemy
from mlflow.exceptions import MlflowException

from src import plots
from src.config import UserError
from src.track import SELECT_BY, TIE_BREAK, run_config

log = logging.getLogger(__name__)

# The configuration columns shown first; any other param that changes results and varies between the runs
# is shown after them. Runs that share every such param but the seed are one configuration.
CONFIGURATION = {"params.backbone.name": "backbone", "params.lr": "lr", "params.batch_size": "batch_size",
                 "params.model.dropout": "dropout", "params.model.label_smoothing": "label_smoothing",
                 "params.model.augmentation.enabled": "augmentation",
                 "params.model.normalize_features": "normalize_features"}
RESULTS = {"tags.optuna.trial": "trial", f"metrics.{SELECT_BY}": SELECT_BY, f"metrics.{TIE_BREAK}": TIE_BREAK,
           "metrics.val/accuracy_tta": "val/accuracy_tta", "metrics.test/accuracy": "test/accuracy",
           "metrics.test/accuracy_single_view": "test/accuracy_single_view",
           "metrics.test/top5_accuracy": "test/top5_accuracy",
           "metrics.best_epoch": "best_epoch", "metrics.epochs_trained": "epochs_trained",
           "metrics.time/train_s": "time/train_s", "metrics.model/size_mb": "model/size_mb", "tags.error": "error",
           "run_id": "run_id"}
# Params that do not change what a run learns: where things are, how it is served, logged or exported.
NOT_CONFIGURATION = ("params.seed", "params.optuna_trial", "params.paths.", "params.tracking.", "params.serve.",
                     "params.registry.", "params.export.", "params.trainer.verbose", "params.trainer.feature_cache",
                     "params.backbone.handle", "params.data.data_dir", "params.data.download", "params.data.cache",
                     "params.backbones")  # the backbone column names every backbone of a run (its tag)
INTEGERS = ("batch_size", "seed", "epochs_trained", "best_epoch")
ACCURACIES = [SELECT_BY, "val/accuracy_tta", "test/accuracy", "test/accuracy_single_view", "test/top5_accuracy"]
MISTAKES = 12


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """`mlflow.search_runs` output -> one row per run, best on validation first: run, status, configuration
    (CONFIGURATION and any other param that varies), seed, then the results (RESULTS)."""
    if "tags.backbone" in runs:  # `a+b` for a run on several backbones (params.backbone.name is then unused)
        runs = runs.assign(**{"params.backbone.name": runs["tags.backbone"].fillna(runs["params.backbone.name"])})
    varying = sorted(c for c in runs if c.startswith("params.") and c not in CONFIGURATION  # sorted: same order
                     and not c.startswith(NOT_CONFIGURATION) and runs[c].nunique(dropna=False) > 1)  # every report
    columns = {"tags.mlflow.runName": "run", "status": "status", **CONFIGURATION,
               **{c: c.removeprefix("params.") for c in varying}, "params.seed": "seed", **RESULTS}
    table = runs.reindex(columns=list(columns)).rename(columns=columns)
    for column in ("lr", "dropout", "label_smoothing", *INTEGERS):
        table[column] = _number(table[column], integer=column in INTEGERS)
    return table.sort_values([SELECT_BY, TIE_BREAK], ascending=[False, True], na_position="last", ignore_index=True)


def _number(values: pd.Series, integer: bool) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers.astype("Int64") if integer and (numbers.dropna() % 1 == 0).all() else numbers


def configuration_columns(table: pd.DataFrame) -> list[str]:
    return list(table.columns[table.columns.get_loc("status") + 1: table.columns.get_loc("seed")])


def finished(table: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished with a val accuracy, best first."""
    return table[(table["status"] == "FINISHED") & table[SELECT_BY].notna()]


def markdown(table: pd.DataFrame, configuration: list[str]) -> str:
    """The table in markdown, without empty columns; configuration values shared by every row are named in a
    line above it instead of repeated in columns."""
    table = table.dropna(axis=1, how="all")
    fixed = [c for c in configuration if c in table and table[c].nunique(dropna=False) == 1 and len(table) > 1]
    text = f"Same in every row: {', '.join(f'{c} {table[c].iloc[0]}' for c in fixed)}.\n\n" if fixed else ""
    shown = table.drop(columns=fixed).astype(object)
    return text + shown.where(shown.notna(), "").to_markdown(index=False, floatfmt=".4g") + "\n"


def experiment_runs(client: mlflow.MlflowClient, experiment_name: str) -> pd.DataFrame:
    """The experiment's training runs (not its sweep or report runs) as a `runs_table`."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise UserError(f"no MLflow experiment '{experiment_name}' in {mlflow.get_tracking_uri()}; run it first "
                        f"(python train.py -m experiment={experiment_name}); experiments there: {known}")
    runs = mlflow.search_runs([experiment.experiment_id])
    for tag in ("tags.sweep", "tags.report"):
        if tag in runs:
            runs = runs[runs[tag] != "true"]
    if runs.empty:
        raise UserError(f"experiment '{experiment_name}' has no training runs yet; "
                        f"run it first (python train.py -m experiment={experiment_name})")
    return runs_table(runs)


def summarize_configurations(table: pd.DataFrame) -> pd.DataFrame:
    """Finished runs grouped by configuration (everything but the seed): n runs, their distinct seeds, and
    the mean and std of each accuracy and of the val loss; best first, as runs are ranked, on the means."""
    done = finished(table)
    keys = [c for c in configuration_columns(table) if done[c].notna().any()]
    grouped = done.groupby(keys, dropna=False)
    summary = grouped[[*ACCURACIES, TIE_BREAK]].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "seeds", grouped["seed"].nunique())
    summary.insert(0, "n", grouped.size())
    return summary.reset_index().sort_values([f"{SELECT_BY}_mean", f"{TIE_BREAK}_mean"], ascending=[False, True],
                                             ignore_index=True)


def by_backbone(summary: pd.DataFrame) -> pd.DataFrame:
    """Per backbone, its configuration with the best mean val accuracy, from `summarize_configurations`."""
    return summary.drop_duplicates("backbone").sort_values("backbone", ignore_index=True)


def write_report(client: mlflow.MlflowClient, experiment_name: str, out_dir: Path,
                 optuna_storage: str | None = None) -> list[str]:
    """Write the report's files into `out_dir`, replacing what a previous report left there, and log them to a
    new `report` run of the experiment. If a part fails, the folder and the store are left as they were.
    Returns the file names."""
    table = experiment_runs(client, experiment_name)
    done = finished(table)
    if done.empty:
        raise UserError(f"experiment '{experiment_name}' has no finished run with {SELECT_BY}; "
                        "see runs.csv's status and error columns in the MLflow UI (make ui)")
    best = client.get_run(done.iloc[0]["run_id"])
    summary = summarize_configurations(table)
    figures = {"validation_curves.png": plots.validation_curves(
        _val_curves(client, done), _label(done, best.info.run_id), f"{experiment_name}: val accuracy per epoch")}
    if "backbone" in summary:
        figures["accuracy_by_backbone.png"] = plots.accuracy_bars(
            by_backbone(summary), "backbone", f"{experiment_name}: accuracy per backbone (its best configuration)")
    varying = [c for c in configuration_columns(table) if c in summary and summary[c].nunique(dropna=False) > 1]
    if set(varying) - {"backbone", "lr", "batch_size"} and len(summary) <= 12:  # techniques, not a grid or search
        labels = summary.assign(configuration=[_configuration_label(row, varying) for _, row in summary.iterrows()])
        figures["accuracy_by_configuration.png"] = plots.accuracy_bars(
            labels, "configuration", f"{experiment_name}: accuracy per configuration")
    if "lr" in summary and summary["lr"].nunique() > 1:
        others = [c for c in configuration_columns(table) if c not in ("backbone", "lr", "batch_size")]
        figures["accuracy_vs_lr.png"] = plots.accuracy_vs_lr(
            summary, f"{experiment_name}: accuracy against lr",
            connect=all(summary[c].nunique(dropna=False) <= 1 for c in others))
    study = _study(client, best.info.experiment_id, optuna_storage)
    if study is not None:
        from src.search import study_figures

        figures |= {f"optuna_{name}": figure for name, figure in study_figures(study).items()}
    figures |= _best_run_figures(best)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))  # same file system
    try:
        staging.chmod(0o755)
        table.to_csv(staging / "runs.csv", index=False)
        configuration = configuration_columns(table)
        (staging / "runs.md").write_text(markdown(table.drop(columns=["run_id"]), configuration))
        summary.to_csv(staging / "summary.csv", index=False)
        (staging / "summary.md").write_text(markdown(_readable(summary), configuration))
        for name, figure in figures.items():
            figure.savefig(staging / name, dpi=110, pil_kwargs={"quality": 85} if name.endswith(".jpg") else None)
        _log_report_run(client, best, len(table), staging)
    except BaseException:
        shutil.rmtree(staging)
        raise
    finally:
        for figure in figures.values():
            plots.plt.close(figure)
    files = sorted(p.name for p in staging.iterdir())
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        shutil.rmtree(old)
    os.replace(staging, out_dir)
    return files


def _configuration_label(row: pd.Series, columns: list[str]) -> str:
    """One line per column that varies, e.g. `4 backbones`, `model.tta=flip`; fine-tuning's settings only where
    it is on."""
    lines = []
    for column in columns:
        value = row[column]
        if column.startswith("finetune.") and column != "finetune.enabled" and str(row.get("finetune.enabled")) != "True":
            continue
        if column == "backbone":
            lines.append(f"{value.count('+') + 1} backbones" if "+" in str(value) else str(value))
        else:
            lines.append(f"{column}={value}")
    return "\n".join(lines)


def _readable(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with each accuracy as "mean ± std" (just the mean for a single run; empty when the runs do
    not log it, e.g. val/accuracy_tta without TTA)."""
    readable = summary.drop(columns=[c for c in summary if c.endswith(("_mean", "_std"))])
    for metric in ACCURACIES:
        readable[metric] = [None if pd.isna(m) else f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"
                            for m, s, n in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["n"])]
    return readable.drop(columns=["seeds"]) if (summary["seeds"] == summary["n"]).all() else readable


def _log_report_run(client: mlflow.MlflowClient, best, runs: int, folder: Path) -> None:
    run = client.create_run(best.info.experiment_id, run_name="report",
                            tags={"report": "true", "report.best_run_id": best.info.run_id,
                                  "report.best_run_name": best.info.run_name})
    try:
        client.log_metric(run.info.run_id, "report/runs", runs)
        client.log_artifacts(run.info.run_id, str(folder), "report")
        client.set_terminated(run.info.run_id)
    except BaseException:
        client.delete_run(run.info.run_id)
        raise


def _label(runs: pd.DataFrame, run_id: str) -> str:
    """A run's name, with its id's start when another run of the table has the same name."""
    name = runs.loc[runs["run_id"] == run_id, "run"].iloc[0]
    return f"{name} ({run_id[:8]})" if (runs["run"] == name).sum() > 1 else name


def _val_curves(client: mlflow.MlflowClient, runs: pd.DataFrame) -> dict[str, pd.Series]:
    curves = {}
    for run_id in runs["run_id"]:
        history = client.get_metric_history(run_id, "val/accuracy")
        curves[_label(runs, run_id)] = pd.Series([m.value for m in history], index=[m.step for m in history]).sort_index()
    return curves


def _study(client: mlflow.MlflowClient, experiment_id: str, storage: str | None) -> optuna.Study | None:
    """The Optuna study of the experiment's latest sweep that ran one (tags optuna.study, optuna.storage)."""
    sweeps = client.search_runs([experiment_id], "tags.sweep = 'true' and tags.`optuna.study` != ''",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        return None
    name, storage = sweeps[0].data.tags["optuna.study"], storage or sweeps[0].data.tags.get("optuna.storage")
    fix = "pass its storage with --optuna-storage URL"
    if storage is None:
        log.warning("study '%s' was kept in memory, so its Optuna figures cannot be drawn", name)
        return None
    if "***" in storage:
        raise UserError(f"the Optuna storage of study '{name}' was logged without its password; {fix}")
    shown = sqlalchemy.engine.make_url(storage).render_as_string()
    local = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else \
        storage.removeprefix("journal://") if storage.startswith("journal://") else None
    if local is not None and not Path(local).is_file():
        raise UserError(f"Optuna study '{name}': {shown} does not exist here; {fix}")
    from src.search import make_storage

    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage))
    except (KeyError, ValueError, sqlalchemy.exc.SQLAlchemyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"cannot load Optuna study '{name}' from {shown} ({reason}); {fix}") from None


def _best_run_figures(best) -> dict:
    """The best run's test confusions among its most-confused classes, and its most confident mistakes."""
    run_id, name = best.info.run_id, best.info.run_name
    try:
        confusion = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="test_confusion_matrix.csv"), index_col=0)
        predictions = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="test_predictions.csv"), index_col="index")
    except MlflowException:
        log.warning("best run %s (%s) has no test_confusion_matrix.csv or test_predictions.csv (a run from before "
                    "they were logged), so its confusion and mistake figures are left out", name, run_id)
        return {}
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    if wrong.empty:
        return {}
    accuracy = 1 - len(wrong) / len(predictions)
    class_names = list(confusion.columns)
    mistakes = wrong.nlargest(MISTAKES, "confidence")
    images = _test_images(run_id, mistakes)
    titles = [f"predicted: {class_names[p]} ({c:.0%})\ntrue: {class_names[t]}"
              for p, c, t in zip(mistakes["predicted"], mistakes["confidence"], mistakes["label"])]
    return {
        "best_run_confusions.png": plots.confused_classes(
            confusion, f"{name}: test confusions among the most-confused classes\n"
                       f"(counts; grey: right, on the diagonal; other classes left out; test accuracy {accuracy:.4f})"),
        "best_run_mistakes.jpg": plots.image_grid(  # photos: a JPEG is a tenth of the PNG
            images, titles, f"{name}: its {len(mistakes)} most confident test mistakes", colors=["red"] * len(images)),
    }


def _test_images(run_id: str, mistakes: pd.DataFrame) -> list[np.ndarray]:
    """The mistakes' test images, by their index in the split, from the data the run was trained on (its logged
    config). Each image's label must be the one the run logged for it: otherwise the data has changed."""
    import tensorflow as tf

    from src.data import load_splits

    config = run_config(run_id)
    wanted, images = dict(zip(mistakes.index, mistakes["label"])), {}
    for index, (image, label) in enumerate(load_splits(config.data).test):
        if index in wanted:
            if int(label) != wanted[index]:
                raise UserError(f"test image {index} of {config.data.name} has label {int(label)}, but run {run_id} "
                                f"logged {wanted[index]}: the data changed since the run; report on a new run")
            images[index] = tf.io.decode_image(image, channels=3, expand_animations=False).numpy()
            if len(images) == len(wanted):
                break
    if len(images) < len(wanted):
        raise UserError(f"the test split of {config.data.name} has fewer images than run {run_id} logged "
                        "predictions for: the data changed since the run; report on a new run")
    return [images[i] for i in mistakes.index]
