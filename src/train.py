"""Training: devices, distribution strategy and precision; compile with the configured optimizer and loss;
fit with early stopping on val accuracy."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as keras_trainer

from src.config import UserError
from src.spec import Optimizer


def configure_cpu_devices(count: int | None) -> None:
    """Split the CPU into `count` logical devices, e.g. to run strategy=mirrored without GPUs. TensorFlow
    allows this only before it initialises its devices, i.e. once per process."""
    if count is None:
        return
    [cpu] = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # devices already initialised: fine if they are what was asked for
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UserError(f"trainer.cpu_devices={count}: TensorFlow already started with "
                            f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s) in this process; "
                            "set it for the first job of the process, or run jobs in separate processes") from None


def make_strategy(name: str, tf_config: str | None = None) -> tf.distribute.Strategy:
    """`default`: one device. `mirrored`: data parallel over every GPU, or over the logical CPU devices on a
    machine without GPUs (trainer.cpu_devices). `multi_worker`: data parallel over processes, each a worker of
    the cluster in `tf_config` (TF_CONFIG's JSON, set here for the strategy to read), with its GPUs or its CPU;
    TensorFlow allows it only before its runtime starts, i.e. once per process."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        os.environ["TF_CONFIG"] = tf_config
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError:
            raise UserError("trainer.strategy=multi_worker: TensorFlow already started in this process; run each "
                            "worker's job in a process of its own, as its first job") from None
        _patch_keras_for_workers()
        return strategy
    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MirroredStrategy([device.name for device in tf.config.list_logical_devices("CPU")])


def _patch_keras_for_workers() -> None:
    """Two steps of Keras 3's fit and evaluate fail across workers (keras-team/keras#20585, Keras 3.15), and are
    replaced: building the model from a first batch averaged over the replicas (building needs only its shapes,
    which this replica's part has), and averaging a step's scalar metrics over the replicas along an axis 0
    that they do not have (their mean over every replica is what one process computes)."""
    def build_from_local_batch(model, iterator=None, data_batch=None):
        if iterator is not None and model._distribute_strategy is not None:
            local = model.distribute_strategy.experimental_local_results
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(lambda v: local(v)[0], next(batches))
                break
            iterator = None
        keras_build(model, iterator, data_batch)

    def mean_over_replicas(values, strategy, reduction="auto"):
        if reduction != "auto":
            return keras_reduce(values, strategy, reduction)
        return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    keras_build, keras_reduce = keras_trainer.TensorFlowTrainer._maybe_symbolic_build, keras_trainer.reduce_per_replica
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = build_from_local_batch
    keras_trainer.reduce_per_replica = mean_over_replicas


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process logs and exports: the one process, or under multi_worker the chief (TF_CONFIG's
    `chief` task, else worker 0)."""
    return strategy.extended.should_checkpoint


def precision_policy(mixed: bool) -> str:
    """Keras's dtype policy: float16 compute on GPUs, bfloat16 elsewhere (it needs no loss scaling; only CPUs
    with AVX512_BF16 or AMX compute it natively, others emulate it more slowly than float32); variables stay
    float32."""
    if not mixed:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


@contextmanager
def precision(mixed: bool):
    """Layers built inside use the policy; the process's global policy is restored after (sweeps run several
    jobs in one process)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision_policy(mixed))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def make_loss(label_smoothing: float) -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def compile_model(model: keras.Model, optimizer: Optimizer, lr: float, label_smoothing: float) -> None:
    model.compile(optimizer=optimizer.make(lr), loss=make_loss(label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])


def profiler(log_dir: Path) -> keras.callbacks.TensorBoard:
    """A TensorFlow Profiler trace of training steps 2 to 5 (after the first step's tracing), with the epoch
    metrics, in TensorBoard's layout under `log_dir`."""
    return keras.callbacks.TensorBoard(log_dir=str(log_dir), profile_batch=(2, 5), write_graph=False)


def one_hot(batches: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    """Categorical labels, which label smoothing needs. Under multi_worker, every worker reads the same batches
    and keeps its part of each (DATA sharding, after tf.distribute splits the global batch between the replicas), so a
    step trains on the batch that one process would; the default AUTO policy would try to shard by file first."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.map(lambda x, y: (x, tf.one_hot(y, num_classes)),
                       num_parallel_calls=tf.data.AUTOTUNE).with_options(options)


@dataclass(frozen=True)
class Schedule:
    """Train from epoch `initial_epoch` up to epoch `epochs`; with `patience`, stop after that many epochs without
    progress in `monitor` (a metric that a callback before early stopping may add) and restore the best epoch's
    weights."""
    epochs: int
    patience: int | None = None
    initial_epoch: int = 0
    monitor: str = "val_accuracy"


def fit(model: keras.Model, train: tf.data.Dataset, validation: tf.data.Dataset | None, schedule: Schedule,
        callbacks=(), verbose: int = 1) -> keras.callbacks.History:
    """Fit on train batches of (inputs, int labels). With validation, record val loss and accuracy per epoch and
    stop early if the schedule has a patience; without patience (a refit, or cross-validation's fixed budget),
    train every epoch. Early stopping comes after `callbacks`, so that it sees the metrics they add."""
    num_classes = model.output_shape[-1]
    callbacks = list(callbacks)
    if validation is not None:
        if schedule.patience is not None:
            callbacks.append(keras.callbacks.EarlyStopping(monitor=schedule.monitor, mode="max", verbose=1,
                                                           patience=schedule.patience, restore_best_weights=True))
        validation = one_hot(validation, num_classes)
    return model.fit(one_hot(train, num_classes), validation_data=validation, epochs=schedule.epochs,
                     initial_epoch=schedule.initial_epoch, callbacks=callbacks, verbose=verbose,
                     shuffle=False)  # the tf.data pipeline shuffles
