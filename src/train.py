"""Training: compile with the configured optimizer and loss, fit with early stopping on val accuracy."""

from __future__ import annotations

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from src.config import UserError


def make_loss(cfg: DictConfig) -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(label_smoothing=cfg.model.label_smoothing)


def make_optimizer(cfg: DictConfig) -> keras.optimizers.Optimizer:
    options = OmegaConf.to_container(cfg.trainer.optimizer)
    name = options.pop("name")
    try:
        return keras.optimizers.get({"class_name": name, "config": {"learning_rate": cfg.lr, **options}})
    except (ValueError, TypeError) as error:
        raise UserError(f"trainer.optimizer={name!r} with {options} is not a Keras optimizer: {error}") from None


def compile_model(model: keras.Model, cfg: DictConfig) -> None:
    model.compile(optimizer=make_optimizer(cfg), loss=make_loss(cfg),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


def one_hot(batches: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    """Categorical labels, which label smoothing needs."""
    return batches.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)


def fit(model: keras.Model, train: tf.data.Dataset, validation: tf.data.Dataset, num_classes: int,
        cfg: DictConfig, callbacks=()) -> keras.callbacks.History:
    """Fit on train; stop early on val accuracy and restore the best epoch's weights."""
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", patience=cfg.trainer.early_stopping.patience,
        restore_best_weights=True, verbose=1)
    return model.fit(one_hot(train, num_classes), validation_data=one_hot(validation, num_classes),
                     epochs=cfg.epochs, callbacks=[early_stopping, *callbacks], verbose=cfg.trainer.verbose,
                     shuffle=False)  # the tf.data pipeline shuffles
