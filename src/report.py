"""Reports: an MLflow experiment's runs -> a table, a per-configuration summary and figures, written to a
folder (experiments/<name>/results) and logged to a `report` run of the same experiment.

The best run is chosen on validation (`register.best_run`: highest val/accuracy_best, ties to the lower
val/loss_at_best); its test confusions and mistakes are drawn, never used to choose.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
from omegaconf import OmegaConf

from src import plots, register
from src.config import UserError
from src.track import SELECT_BY, TIE_BREAK

log = logging.getLogger(__name__)

# MLflow search_runs column -> report column. The configuration columns come first; a summary groups the
# runs that share them (e.g. the seeds of one configuration).
CONFIGURATION = {"params.backbone.name": "backbone", "params.lr": "lr", "params.batch_size": "batch_size",
                 "params.model.dropout": "dropout", "params.model.label_smoothing": "label_smoothing",
                 "params.model.augmentation.enabled": "augmentation",
                 "params.model.normalize_features": "normalize_features"}
COLUMNS = {"tags.mlflow.runName": "run", "status": "status", **CONFIGURATION, "params.seed": "seed",
           "tags.optuna.trial": "trial", f"metrics.{SELECT_BY}": SELECT_BY, f"metrics.{TIE_BREAK}": TIE_BREAK,
           "metrics.test/accuracy": "test/accuracy", "metrics.test/top5_accuracy": "test/top5_accuracy",
           "metrics.best_epoch": "best_epoch", "metrics.epochs_trained": "epochs", "metrics.time/train_s": "time/train_s",
           "metrics.model/size_mb": "model/size_mb", "tags.error": "error", "run_id": "run_id"}
NUMERIC = {"lr": float, "batch_size": "Int64", "dropout": float, "label_smoothing": float, "seed": "Int64"}
ACCURACIES = [SELECT_BY, "test/accuracy", "test/top5_accuracy"]
MISTAKES = 12


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """`mlflow.search_runs` output -> one row per run with the report's columns, best on validation first."""
    table = runs.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS)
    for column, dtype in NUMERIC.items():
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(dtype)
    return table.sort_values([SELECT_BY, TIE_BREAK], ascending=[False, True], na_position="last", ignore_index=True)


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
    """Finished runs grouped by configuration (everything but the seed): n, and mean and std of each accuracy,
    best mean val accuracy first."""
    finished = table[(table["status"] == "FINISHED") & table[SELECT_BY].notna()]
    keys = [c for c in CONFIGURATION.values() if finished[c].notna().any()]
    grouped = finished.groupby(keys, dropna=False)[ACCURACIES]
    summary = grouped.agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "n", grouped.size())
    return summary.reset_index().sort_values(f"{SELECT_BY}_mean", ascending=False, ignore_index=True)


def by_backbone(table: pd.DataFrame) -> pd.DataFrame:
    """Per backbone, its configuration with the best mean val accuracy, as in `summarize_configurations`."""
    summary = summarize_configurations(table)
    return summary.drop_duplicates("backbone").sort_values("backbone", ignore_index=True)


def write_report(client: mlflow.MlflowClient, experiment_name: str, out_dir: Path,
                 optuna_storage: str | None = None) -> list[str]:
    """Write the report's files into `out_dir` (replacing what a previous report left there) and log them to a
    new `report` run of the experiment. Nothing is written if a part fails. Returns the file names."""
    table = experiment_runs(client, experiment_name)
    best = register.best_run(client, experiment_name)
    summary = summarize_configurations(table)
    finished = table[table["status"] == "FINISHED"]
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        _write_tables(table, summary, staging)
        figures = {"validation_curves.png": plots.validation_curves(
            _val_curves(client, finished), best.info.run_name, f"{experiment_name}: val accuracy per epoch")}
        figures["accuracy_by_backbone.png"] = plots.accuracy_bars(
            by_backbone(table), "backbone", f"{experiment_name}: accuracy per backbone (mean ± std over runs)")
        if summary["lr"].nunique() > 1:
            figures["accuracy_vs_lr.png"] = plots.accuracy_vs_lr(summary, f"{experiment_name}: accuracy against lr")
        study = _study(client, experiment_name, optuna_storage)
        if study is not None:
            from src.search import study_figures

            figures |= {f"optuna_{name}": figure for name, figure in study_figures(study).items()}
        figures |= _best_run_figures(best)
        for name, figure in figures.items():
            figure.savefig(staging / name, dpi=110, pil_kwargs={"quality": 85} if name.endswith(".jpg") else None)
            plots.plt.close(figure)
        files = sorted(p.name for p in staging.iterdir())
        with mlflow.start_run(experiment_id=best.info.experiment_id, run_name="report",
                              tags={"report": "true", "report.best_run_id": best.info.run_id,
                                    "report.best_run_name": best.info.run_name}):
            mlflow.log_metric("report/runs", len(table))
            mlflow.log_artifacts(str(staging), "report")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        for path in staging.iterdir():
            shutil.copy(path, out_dir)
    return files


def _write_tables(table: pd.DataFrame, summary: pd.DataFrame, folder: Path) -> None:
    """CSVs with every column; markdown with the columns that vary, after a line naming the fixed values."""
    table.to_csv(folder / "runs.csv", index=False)
    (folder / "runs.md").write_text(_markdown(table.drop(columns=["run_id"])))
    summary.to_csv(folder / "summary.csv", index=False)
    readable = summary.drop(columns=[c for c in summary if c.endswith(("_mean", "_std"))])
    for metric in ACCURACIES:
        readable[metric] = [f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"
                            for m, s, n in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["n"])]
    (folder / "summary.md").write_text(_markdown(readable))


def _markdown(table: pd.DataFrame) -> str:
    table = table.dropna(axis=1, how="all")
    fixed = [c for c in table if c in CONFIGURATION.values() and table[c].nunique(dropna=False) == 1 and len(table) > 1]
    text = f"Same in every row: {', '.join(f'{c} {table[c].iloc[0]}' for c in fixed)}.\n\n" if fixed else ""
    shown = table.drop(columns=fixed).astype(object)
    return text + shown.where(shown.notna(), "").to_markdown(index=False, floatfmt=".4g") + "\n"


def _val_curves(client: mlflow.MlflowClient, runs: pd.DataFrame) -> dict[str, pd.Series]:
    curves = {}
    for name, run_id in zip(runs["run"], runs["run_id"]):
        history = client.get_metric_history(run_id, "val/accuracy")
        curves[name] = pd.Series([m.value for m in history], index=[m.step for m in history]).sort_index()
    return curves


def _study(client: mlflow.MlflowClient, experiment_name: str, storage: str | None) -> optuna.Study | None:
    """The Optuna study of the experiment's latest sweep that ran one (tags optuna.study, optuna.storage)."""
    experiment = client.get_experiment_by_name(experiment_name)
    sweeps = client.search_runs([experiment.experiment_id], "tags.sweep = 'true' and tags.`optuna.study` != ''",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        return None
    name, storage = sweeps[0].data.tags["optuna.study"], storage or sweeps[0].data.tags.get("optuna.storage")
    if "***" in (storage or ""):
        raise UserError(f"the Optuna storage of study '{name}' was logged without its password; "
                        "pass it with --optuna-storage URL")
    from src.search import make_storage

    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage))
    except (KeyError, ValueError) as error:
        raise UserError(f"cannot load Optuna study '{name}' from {storage}: {error}; "
                        "pass its storage with --optuna-storage URL") from None


def _best_run_figures(best) -> dict:
    """The best run's test confusions among its most-confused classes, and its most confident mistakes."""
    run_id, name = best.info.run_id, best.info.run_name
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_confusion_matrix.csv"))
    confusion = pd.read_csv(folder, index_col=0)
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv"),
                              index_col="index")
    mistakes = predictions[predictions["label"] != predictions["predicted"]].nlargest(MISTAKES, "confidence")
    accuracy = 1 - len(predictions[predictions["label"] != predictions["predicted"]]) / len(predictions)
    figures = {"best_run_confusions.png": plots.confused_classes(
        confusion, f"{name}: test confusions among the most-confused classes\n"
                   f"(counts; grey: right, on the diagonal; other classes left out; test accuracy {accuracy:.4f})")}
    if len(mistakes):
        images = _test_images(run_id, list(mistakes.index))
        class_names = list(confusion.columns)
        titles = [f"predicted: {class_names[p]} ({c:.0%})\ntrue: {class_names[t]}"
                  for p, c, t in zip(mistakes["predicted"], mistakes["confidence"], mistakes["label"])]
        figures["best_run_mistakes.jpg"] = plots.image_grid(  # photos: a JPEG a tenth of the PNG
            [images[i] for i in mistakes.index], titles,
            f"{name}: its {len(mistakes)} most confident test mistakes", colors=["red"] * len(mistakes))
    return figures


def _test_images(run_id: str, indices: list[int]) -> dict[int, np.ndarray]:
    """Test images by their index in the split, from the data the run was trained on (its logged config)."""
    import tensorflow as tf

    from src.data import load_splits

    config = OmegaConf.create(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    wanted, images = set(indices), {}
    for index, (image, _) in enumerate(load_splits(config.data).test):
        if index in wanted:
            images[index] = tf.io.decode_image(image, channels=3, expand_animations=False).numpy()
            if len(images) == len(wanted):
                break
    return images
