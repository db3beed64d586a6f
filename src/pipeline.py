"""One job, start to end: data -> backbone -> model -> train -> evaluate -> export, as one MLflow run."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import optuna
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from src import features, plots, track
from src.backbone import HubFeatureVector, load_backbone
from src.config import flatten, validate
from src.data import SPLITS, Splits, load_splits, make_batches
from src.evaluate import evaluate
from src.export import export_saved_model, log_pyfunc_model, size_mb
from src.model import build_feature_extractor, build_head, build_model
from src.train import (compile_model, configure_cpu_devices, fit, make_loss, make_optimizer, make_strategy, precision,
                       profiler)

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    splits: Splits
    backbone: HubFeatureVector
    strategy: tf.distribute.Strategy


def prepare(cfg: DictConfig) -> Inputs:
    """Everything that fails on bad input: config values, devices, the dataset, the backbone."""
    configure_cpu_devices(cfg.trainer.cpu_devices)  # before anything starts TensorFlow
    validate(cfg)
    make_optimizer(cfg)
    strategy = make_strategy(cfg.trainer)
    splits = load_splits(cfg.data)
    with strategy.scope():  # the backbone's variables are the strategy's (mirrored) variables
        return Inputs(splits, load_backbone(cfg.backbone), strategy)


def run_job(cfg: DictConfig, output_dir: Path, parent_run_id: str | None = None,
            callbacks: list[keras.callbacks.Callback] = ()) -> dict[str, float]:
    """Train on train, select on validation, report on test. Returns the run's final metrics.

    A single job checks its inputs before the MLflow run exists, so bad input leaves no trace. A job of a
    sweep (`parent_run_id`) starts its run first, so that a failure stays visible in the sweep as FAILED."""
    if parent_run_id is None:
        inputs = prepare(cfg)
        track.setup(cfg.tracking)
        with _mlflow_run(cfg, None):
            return _train_and_log(cfg, inputs, output_dir, callbacks)
    track.setup(cfg.tracking)
    with _mlflow_run(cfg, parent_run_id):
        return _train_and_log(cfg, prepare(cfg), output_dir, callbacks)


@contextlib.contextmanager
def _mlflow_run(cfg: DictConfig, parent_run_id: str | None):
    name = track.run_name(cfg)
    with mlflow.start_run(run_name=name, parent_run_id=parent_run_id) as run:
        log.info("MLflow run %s (%s) in %s", name, run.info.run_id, cfg.tracking.uri)
        try:
            mlflow.log_params(flatten(cfg))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            yield run
        except BaseException as error:  # say why the run ended: FAILED, or KILLED when stopped on purpose
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.end_run("KILLED" if isinstance(error, (KeyboardInterrupt, optuna.TrialPruned)) else "FAILED")
            raise


def _train_and_log(cfg: DictConfig, inputs: Inputs, output_dir: Path, callbacks) -> dict[str, float]:
    with precision(cfg.trainer.mixed_precision):
        return _train_and_log_with_policy(cfg, inputs, output_dir, callbacks)


def _train_and_log_with_policy(cfg: DictConfig, inputs: Inputs, output_dir: Path, callbacks) -> dict[str, float]:
    splits, backbone, strategy = inputs.splits, inputs.backbone, inputs.strategy
    mlflow.set_tags(track.run_tags(cfg, splits.name, splits.version, strategy))
    keras.utils.set_random_seed(cfg.seed)
    size, num_classes = tuple(cfg.backbone.input_size), len(splits.class_names)
    callbacks = [track.EpochMetrics(), *callbacks]
    if cfg.trainer.profile:
        callbacks.append(profiler(output_dir / "tensorboard"))

    use_cache = features.applies(cfg)
    mlflow.set_tag("feature_cache", str(use_cache).lower())
    start = time.perf_counter()
    if use_cache:
        cached = _cached_features(cfg, splits, backbone)
        mlflow.log_metric("time/features_s", time.perf_counter() - start)  # ~0 once the cache holds them
        with strategy.scope():
            head = build_head(num_classes, cfg.model)
            head.build((None, cached["train"][0].shape[1]))
            compile_model(head, cfg)
        history = fit(head, _feature_batches(cached["train"], cfg.batch_size, cfg.seed),
                      _feature_batches(cached["validation"], cfg.batch_size), num_classes, cfg, callbacks)
        model = build_model(backbone, size, num_classes, cfg.model, cfg.seed, head=head)
        evaluated, test_batches = head, _feature_batches(cached["test"], cfg.batch_size)
    else:
        with strategy.scope():
            model = build_model(backbone, size, num_classes, cfg.model, cfg.seed)
            compile_model(model, cfg)
        history = fit(model, make_batches(splits.train, size, cfg.batch_size, cache=cfg.data.cache,
                                          shuffle_seed=cfg.seed),
                      make_batches(splits.validation, size, cfg.batch_size, cache=cfg.data.cache),
                      num_classes, cfg, callbacks)
        evaluated, test_batches = model, make_batches(splits.test, size, cfg.batch_size)
    train_seconds = time.perf_counter() - start
    if cfg.trainer.profile:
        mlflow.log_artifacts(str(output_dir / "tensorboard"), "tensorboard")

    start = time.perf_counter()
    result = evaluate(evaluated, test_batches, splits.class_names, make_loss(cfg))
    eval_seconds = time.perf_counter() - start

    curves = pd.DataFrame(history.history).rename(columns=track.EPOCH_METRICS)
    curves.index = curves.index + 1
    best_epoch = int(curves["val/accuracy"].idxmax())
    metrics = {
        "val/accuracy_best": float(curves.loc[best_epoch, "val/accuracy"]),
        "val/loss_at_best": float(curves.loc[best_epoch, "val/loss"]),
        "best_epoch": best_epoch,
        "epochs_trained": len(curves),
        **result.metrics,
        "time/train_s": train_seconds,
        "time/eval_s": eval_seconds,
    }
    mlflow.log_metrics(metrics)
    _log_plots(cfg, model, splits, curves, result.confusion)
    _log_evaluation(result, splits.class_names, output_dir)

    saved_model = export_saved_model(model, splits.class_names, size, cfg.export.top_k,
                                     output_dir / "saved_model" / cfg.export.model_name / str(cfg.export.version))
    mlflow.log_artifacts(str(saved_model.parent.parent), "saved_model")
    mlflow.log_metric("model/size_mb", size_mb(saved_model))
    example = next(iter(splits.test.take(1)))[0].numpy()
    log_pyfunc_model(saved_model, [example])

    log.info("test accuracy %.4f (top-5 %.4f), best val accuracy %.4f at epoch %d; train %.0f s",
             metrics["test/accuracy"], metrics["test/top5_accuracy"], metrics["val/accuracy_best"],
             metrics["best_epoch"], train_seconds)
    return metrics


def _cached_features(cfg: DictConfig, splits: Splits, backbone: HubFeatureVector) -> dict:
    """(features, labels) per split, from the cache or extracted into it."""
    size = tuple(cfg.backbone.input_size)
    extractor = build_feature_extractor(backbone, size)
    backbone_files = features.files_digest(backbone.module_path)
    cached = {}
    for split in SPLITS:
        split_spec = OmegaConf.select(cfg.data, f"splits.{split}", default=split)
        key = features.cache_key(backbone.module_path, backbone_files, size, splits.name, splits.version, split_spec)
        batches = make_batches(getattr(splits, split), size, cfg.batch_size)
        cached[split] = features.load_or_extract(extractor, batches, Path(cfg.paths.cache_dir) / "features" / f"{key}.npz")
    return cached


def _feature_batches(split_features, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(split_features)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(split_features[1]), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _log_evaluation(result, class_names: list[str], output_dir: Path) -> None:
    """The test evaluation as data, for reports: per-class accuracy, the confusion matrix (rows: true class,
    columns: predicted) and every test image's prediction, by its index in the split."""
    output_dir.mkdir(parents=True, exist_ok=True)
    confusion = pd.DataFrame(result.confusion, index=pd.Index(class_names, name="true"), columns=class_names)
    files = {"per_class_accuracy.csv": lambda path: result.per_class.to_csv(path, index=False),
             "test_confusion_matrix.csv": confusion.to_csv,
             "test_predictions.csv": result.predictions.to_csv}
    for name, write in files.items():
        write(output_dir / name)
        mlflow.log_artifact(str(output_dir / name))


def _log_plots(cfg: DictConfig, model: keras.Model, splits: Splits, curves: pd.DataFrame, confusion) -> None:
    name = track.run_name(cfg)
    images, labels = next(iter(make_batches(splits.test, tuple(cfg.backbone.input_size),
                                            cfg.export.sample_predictions)))
    figures = {
        "plots/training_curves.png": plots.training_curves(curves, name),
        "plots/confusion_matrix.png": plots.confusion_matrix(confusion, splits.class_names,
                                                             f"{name}: test confusion matrix"),
        "plots/test_predictions.png": plots.sample_predictions(images.numpy(), labels.numpy(),
                                                               model(images, training=False).numpy(), splits.class_names,
                                                               f"{name}: test predictions"),
    }
    for artifact_file, figure in figures.items():
        mlflow.log_figure(figure, artifact_file)
        plots.plt.close(figure)
