"""One job, start to end: data -> backbone -> model -> train -> evaluate -> export, as one MLflow run."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras
import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from src import plots, track
from src.backbone import load_backbone
from src.config import flatten, validate
from src.data import load_splits, make_batches
from src.evaluate import evaluate
from src.export import export_saved_model, log_pyfunc_model
from src.model import build_model
from src.train import compile_model, fit, make_loss

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Train on train, select on validation, report on test. Returns the run's final metrics."""
    validate(cfg)
    # Everything that can fail on bad input runs before the MLflow run exists, so a failure leaves no trace.
    splits = load_splits(cfg.data)
    backbone = load_backbone(cfg.backbone)
    track.setup(cfg.tracking)
    keras.utils.set_random_seed(cfg.seed)

    size, num_classes = tuple(cfg.backbone.input_size), len(splits.class_names)
    train = make_batches(splits.train, size, cfg.batch_size, cache=cfg.data.cache, shuffle_seed=cfg.seed)
    validation = make_batches(splits.validation, size, cfg.batch_size, cache=cfg.data.cache)
    test = make_batches(splits.test, size, cfg.batch_size)

    name = track.run_name(cfg)
    with mlflow.start_run(run_name=name, tags=track.run_tags(cfg, splits.name, splits.version)) as run:
        log.info("MLflow run %s (%s) in %s", name, run.info.run_id, cfg.tracking.uri)
        mlflow.log_params(flatten(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

        model = build_model(backbone, size, num_classes, cfg.model, cfg.seed)
        compile_model(model, cfg)
        start = time.perf_counter()
        history = fit(model, train, validation, num_classes, cfg, callbacks=[track.EpochMetrics()])
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        result = evaluate(model, test, splits.class_names, make_loss(cfg), cfg.export.sample_predictions)
        eval_seconds = time.perf_counter() - start

        curves = pd.DataFrame(history.history).rename(columns=track.EPOCH_METRICS)
        curves.index = curves.index + 1
        metrics = {
            "val/accuracy_best": float(curves["val/accuracy"].max()),
            "best_epoch": int(curves["val/accuracy"].idxmax()),
            "epochs_trained": len(curves),
            **result.metrics,
            "time/train_s": train_seconds,
            "time/eval_s": eval_seconds,
        }
        mlflow.log_metrics(metrics)
        _log_figure(plots.training_curves(curves, name), "plots/training_curves.png")
        _log_figure(plots.confusion_matrix(result.confusion, splits.class_names, f"{name}: test confusion matrix"),
                    "plots/confusion_matrix.png")
        _log_figure(plots.sample_predictions(result.sample_images, result.sample_labels, result.sample_probabilities,
                                             splits.class_names, f"{name}: test predictions"),
                    "plots/test_predictions.png")
        per_class_csv = output_dir / "per_class_accuracy.csv"
        result.per_class.to_csv(per_class_csv, index=False)
        mlflow.log_artifact(str(per_class_csv))

        saved_model = export_saved_model(model, splits.class_names, size, cfg.export.top_k,
                                         output_dir / "saved_model" / cfg.export.model_name / str(cfg.export.version))
        mlflow.log_artifacts(str(saved_model.parent.parent), "saved_model")
        example = next(iter(splits.test.take(1)))[0].numpy()
        log_pyfunc_model(saved_model, [example])

    log.info("test accuracy %.4f (top-5 %.4f), best val accuracy %.4f at epoch %d; train %.0f s",
             metrics["test/accuracy"], metrics["test/top5_accuracy"], metrics["val/accuracy_best"],
             metrics["best_epoch"], train_seconds)
    return metrics


def _log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)
    plots.plt.close(figure)
