"""One job, start to end: data -> backbone -> model -> train -> evaluate -> export, as one MLflow run."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import mlflow
import numpy as np
import optuna
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from src import features, plots, track
from src.backbone import HubFeatureVector, load_backbone
from src.config import backbone_configs, flatten, model_input_size, validate
from src.data import SPLITS, Splits, load_splits, make_batches
from src.evaluate import accuracy, evaluation
from src.export import export_saved_model, log_pyfunc_model, size_mb
from src.model import (TTA, build_feature_extractor, build_head, build_model, predict_batches, predict_views,
                       tta_views, view)
from src.train import (compile_model, configure_cpu_devices, fit, make_loss, make_optimizer, make_strategy, precision,
                       profiler)

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    splits: Splits
    backbones: list[HubFeatureVector]
    strategy: tf.distribute.Strategy
    input_size: tuple[int, int]  # images are decoded to it; each backbone resizes to its own


def prepare(cfg: DictConfig) -> Inputs:
    """Everything that fails on bad input: config values, devices, the dataset, the backbones."""
    configure_cpu_devices(cfg.trainer.cpu_devices)  # before anything starts TensorFlow
    validate(cfg)
    make_optimizer(cfg)
    tta_views(cfg.model.tta)
    tta_views(cfg.model.train_views, "model.train_views")
    strategy = make_strategy(cfg.trainer)
    splits = load_splits(cfg.data)
    with strategy.scope():  # the backbones' variables are the strategy's (mirrored) variables
        return Inputs(splits, [load_backbone(b) for b in backbone_configs(cfg)], strategy, model_input_size(cfg))


@dataclass
class Trained:
    model: keras.Model  # raw uint8 image -> probabilities
    predict: Callable[[str, tuple], tuple[np.ndarray, np.ndarray]]  # (split, views) -> (mean probabilities, labels)
    curves: pd.DataFrame  # per epoch (from 1): train/loss, train/accuracy[, val/loss, val/accuracy]
    stage_epochs: list[int]  # the selected epoch count of each stage: [head] or [head, fine-tuning]


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
    splits = inputs.splits
    mlflow.set_tags(track.run_tags(cfg, splits.name, splits.version, inputs.strategy))
    keras.utils.set_random_seed(cfg.seed)
    callbacks = [track.EpochMetrics(), *callbacks]
    if cfg.trainer.profile:
        callbacks.append(profiler(output_dir / "tensorboard"))
    tta = tta_views(cfg.model.tta)

    use_cache = features.applies(cfg)
    mlflow.set_tag("feature_cache", str(use_cache).lower())
    pretrained = [backbone.get_weights() for backbone in inputs.backbones] if cfg.trainer.refit else []
    start = time.perf_counter()
    cached = None
    if use_cache:
        train_views = tta_views(cfg.model.train_views)
        refit_views = train_views if cfg.trainer.refit else ()  # a refit trains on validation too
        cached = _cached_features(cfg, inputs, {"train": train_views, "validation": {*refit_views, *tta}, "test": tta})
        mlflow.log_metric("time/features_s", time.perf_counter() - start)  # ~0 once the cache holds them
    trained = _train(cfg, inputs, cached, ("train",), callbacks)
    curves = trained.curves
    best_epoch = int(curves["val/accuracy"].idxmax())
    metrics = {
        "val/accuracy_best": float(curves.loc[best_epoch, "val/accuracy"]),
        "val/loss_at_best": float(curves.loc[best_epoch, "val/loss"]),
        "best_epoch": best_epoch,
        "epochs_trained": len(curves),
    }
    if len(tta) > 1:  # on the selected model, before any refit puts validation into training
        metrics["val/accuracy_tta"] = accuracy(*trained.predict("validation", tta))
    if cfg.trainer.refit:
        log.info("refit on train + validation for %s epochs", trained.stage_epochs)
        for backbone, weights in zip(inputs.backbones, pretrained):  # a trainable or fine-tuned backbone changed
            backbone.set_weights(weights)
        keras.utils.set_random_seed(cfg.seed)
        trained = _train(cfg, inputs, cached, ("train", "validation"), [track.EpochMetrics("refit/")],
                         trained.stage_epochs)
    train_seconds = time.perf_counter() - start
    if cfg.trainer.profile:
        mlflow.log_artifacts(str(output_dir / "tensorboard"), "tensorboard")

    start = time.perf_counter()
    result = evaluation(*trained.predict("test", tta), splits.class_names, make_loss(cfg))
    if len(tta) > 1:
        result.metrics["test/accuracy_single_view"] = accuracy(*trained.predict("test", TTA["none"]))
    eval_seconds = time.perf_counter() - start

    metrics.update({**result.metrics, "time/train_s": train_seconds, "time/eval_s": eval_seconds})
    mlflow.log_metrics(metrics)
    model, size = trained.model, inputs.input_size
    _log_plots(cfg, model, splits, size, curves, result.confusion, tta)
    _log_evaluation(result, splits.class_names, output_dir)

    saved_model = export_saved_model(model, splits.class_names, size, cfg.export.top_k,
                                     output_dir / "saved_model" / cfg.export.model_name / str(cfg.export.version),
                                     views=tta)
    mlflow.log_artifacts(str(saved_model.parent.parent), "saved_model")
    mlflow.log_metric("model/size_mb", size_mb(saved_model))
    example = next(iter(splits.test.take(1)))[0].numpy()
    log_pyfunc_model(saved_model, [example])

    log.info("test accuracy %.4f (top-5 %.4f), best val accuracy %.4f at epoch %d; train %.0f s",
             metrics["test/accuracy"], metrics["test/top5_accuracy"], metrics["val/accuracy_best"],
             metrics["best_epoch"], train_seconds)
    return metrics


def _train(cfg: DictConfig, inputs: Inputs, cached: dict | None, train_splits: tuple[str, ...], callbacks,
           stage_epochs: list[int] | None = None) -> Trained:
    """Stage 1, the head (on cached features when `cached`), then stage 2, fine-tuning, if enabled. Selection
    runs (`stage_epochs` None) stop early on validation; a refit trains each stage for its `stage_epochs`."""
    splits, strategy = inputs.splits, inputs.strategy
    size, num_classes = inputs.input_size, len(splits.class_names)
    validation = "validation" if stage_epochs is None else None
    train_views = tta_views(cfg.model.train_views)
    epochs = stage_epochs[0] if stage_epochs else cfg.epochs
    if cached is not None:
        train = [cached[split, v] for split in train_splits for v in train_views]
        train = (np.concatenate([f for f, _ in train]), np.concatenate([labels for _, labels in train]))
        with strategy.scope():
            head = build_head(num_classes, cfg.model, cached["dims"])
            head.build((None, train[0].shape[1]))
            compile_model(head, cfg)
        history = fit(head, _feature_batches(train, cfg.batch_size, cfg.seed),
                      validation and _feature_batches(cached[validation, "identity"], cfg.batch_size),
                      num_classes, cfg, callbacks, epochs=epochs)
        model = build_model(inputs.backbones, size, num_classes, cfg.model, cfg.seed, head=head)

        def predict(split, views):
            outputs = [predict_batches(head, _feature_batches(cached[split, v], cfg.batch_size)) for v in views]
            return np.mean([probabilities for probabilities, _ in outputs], axis=0), outputs[0][1]
    else:
        with strategy.scope():
            model = build_model(inputs.backbones, size, num_classes, cfg.model, cfg.seed)
            compile_model(model, cfg)
        history = fit(model, _image_batches(cfg, splits, train_splits, size, train_views),
                      validation and _validation_batches(cfg, splits, size),
                      num_classes, cfg, callbacks, epochs=epochs)
        predict = _image_predictor(cfg, splits, size, model)
    curves = _curves(history)
    selected = [int(curves["val/accuracy"].idxmax()) if validation else epochs]
    if cfg.finetune.enabled and (stage_epochs is None or stage_epochs[1] > 0):
        return _finetune(cfg, inputs, model, curves, selected, train_splits, callbacks, stage_epochs)
    return Trained(model, predict, curves, selected)


def _finetune(cfg: DictConfig, inputs: Inputs, stage1: keras.Model, curves: pd.DataFrame, selected: list[int],
              train_splits: tuple[str, ...], callbacks, stage_epochs: list[int] | None) -> Trained:
    """Stage 2: the backbones unfrozen, lr * finetune.lr_scale, model.augmentation's layers on, epochs counted
    on from stage 1's."""
    splits, strategy = inputs.splits, inputs.strategy
    size, num_classes = inputs.input_size, len(splits.class_names)
    model_cfg = OmegaConf.merge(cfg.model, {"augmentation": {"enabled": True}})
    stage1_weights, frozen = stage1.get_weights(), [backbone.trainable for backbone in inputs.backbones]
    with strategy.scope():
        model = build_model(inputs.backbones, size, num_classes, model_cfg, cfg.seed, head=stage1.get_layer("head"))
        for backbone in inputs.backbones:
            backbone.trainable = True
        compile_model(model, OmegaConf.merge(cfg, {"lr": cfg.lr * cfg.finetune.lr_scale}))
    first = len(curves)
    validation = None if stage_epochs else _validation_batches(cfg, splits, size)
    history = fit(model, _image_batches(cfg, splits, train_splits, size, tta_views(cfg.model.train_views)),
                  validation, num_classes, cfg, callbacks, initial_epoch=first,
                  epochs=first + (stage_epochs[1] if stage_epochs else cfg.finetune.epochs),
                  patience=cfg.finetune.patience)
    for backbone, trainable in zip(inputs.backbones, frozen):  # as configured, for a refit
        backbone.trainable = trainable
    stage2 = _curves(history, first)
    if stage_epochs:
        selected = list(stage_epochs)
    elif stage2["val/accuracy"].max() > curves["val/accuracy"].max():
        selected.append(int(stage2["val/accuracy"].idxmax()) - first)
    else:  # fine-tuning never beat the frozen backbone: keep stage 1's model
        stage1.set_weights(stage1_weights)
        selected.append(0)
    if not stage_epochs:
        mlflow.log_metric("finetune/first_epoch", first + 1)
    return Trained(model, _image_predictor(cfg, splits, size, model), pd.concat([curves, stage2]), selected)


def _curves(history: keras.callbacks.History, first: int = 0) -> pd.DataFrame:
    curves = pd.DataFrame(history.history).rename(columns=track.EPOCH_METRICS)
    curves.index = curves.index + first + 1
    return curves


def _image_batches(cfg: DictConfig, splits: Splits, names: tuple[str, ...], size, views) -> tf.data.Dataset:
    """Shuffled training batches of the named splits, each image in every one of `views`."""
    ds = getattr(splits, names[0])
    for name in names[1:]:
        ds = ds.concatenate(getattr(splits, name))
    batches = make_batches(ds, size, cfg.batch_size, cache=cfg.data.cache, shuffle_seed=cfg.seed)
    if len(views) == 1:
        return batches
    return tf.data.Dataset.sample_from_datasets([_viewed(batches, v) for v in views], seed=cfg.seed)


def _validation_batches(cfg: DictConfig, splits: Splits, size) -> tf.data.Dataset:
    return make_batches(splits.validation, size, cfg.batch_size, cache=cfg.data.cache)


def _viewed(batches: tf.data.Dataset, name: str) -> tf.data.Dataset:
    return batches.map(lambda images, labels: (view(images, name), labels))


def _image_predictor(cfg: DictConfig, splits: Splits, size, model: keras.Model):
    def predict(split, views):
        return predict_batches(lambda images, training=False: predict_views(model, images, views),
                               make_batches(getattr(splits, split), size, cfg.batch_size))
    return predict


def _cached_features(cfg: DictConfig, inputs: Inputs, views: dict) -> dict:
    """(features, labels) per (split, view) for the `views` of each split, from the cache or extracted into it,
    with the features of every backbone concatenated; and `dims`, each backbone's feature count."""
    splits, size = inputs.splits, inputs.input_size
    per_backbone = []
    for backbone in inputs.backbones:
        extractor = build_feature_extractor(backbone, size)
        backbone_files = features.files_digest(backbone.module_path)
        cached = {}
        for split in SPLITS:
            split_spec = OmegaConf.select(cfg.data, f"splits.{split}", default=split)
            for v in sorted({"identity", *views[split]}):
                key = features.cache_key(backbone.module_path, backbone_files, backbone.input_size, splits.name,
                                         splits.version, split_spec, decoded_size=size, view=v)
                batches = _viewed(make_batches(getattr(splits, split), size, cfg.batch_size), v)
                cached[split, v] = features.load_or_extract(
                    extractor, batches, Path(cfg.paths.cache_dir) / "features" / f"{key}.npz")
        per_backbone.append(cached)
    joined = {key: (np.concatenate([c[key][0] for c in per_backbone], axis=1), per_backbone[0][key][1])
              for key in per_backbone[0]}
    joined["dims"] = [c["train", "identity"][0].shape[1] for c in per_backbone]
    return joined


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


def _log_plots(cfg: DictConfig, model: keras.Model, splits: Splits, size, curves: pd.DataFrame, confusion,
               views) -> None:
    name = track.run_name(cfg)
    images, labels = next(iter(make_batches(splits.test, size, cfg.export.sample_predictions)))
    figures = {
        "plots/training_curves.png": plots.training_curves(curves, name),
        "plots/confusion_matrix.png": plots.confusion_matrix(confusion, splits.class_names,
                                                             f"{name}: test confusion matrix"),
        "plots/test_predictions.png": plots.sample_predictions(images.numpy(), labels.numpy(),
                                                               predict_views(model, images, views).numpy(), splits.class_names,
                                                               f"{name}: test predictions"),
    }
    for artifact_file, figure in figures.items():
        mlflow.log_figure(figure, artifact_file)
        plots.plt.close(figure)
