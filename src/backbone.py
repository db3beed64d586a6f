"""Backbones: a TF-Hub image feature vector (tfhub.dev handle or local SavedModel) as a Keras 3 layer.

`tensorflow_hub.KerasLayer` is a Keras 2 layer and cannot go into a Keras 3 model, so this small layer
loads the SavedModel with `tf.saved_model.load` and tracks the module's own TF variables as Keras
variables (wrapping, not copying them), which makes `trainable` and any Keras optimizer work.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import keras
import tensorflow as tf
from omegaconf import DictConfig

from src.config import UserError


def resolve_handle(handle: str) -> str:
    """A local SavedModel folder as is; a tfhub.dev / Kaggle URL downloaded into TF-Hub's cache."""
    if urlparse(handle).scheme in ("http", "https"):
        return _download(handle)
    path = Path(handle).expanduser()
    if not (path / "saved_model.pb").is_file():
        raise UserError(f"backbone handle {handle} is not a SavedModel folder (no saved_model.pb); "
                        "fix backbone.handle or set FLOWERS_BACKBONES_DIR to the folder of offline backbones")
    return str(path.resolve())


def _download(url: str, timeout: float = 5.0) -> str:
    import tensorflow_hub as hub

    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        raise UserError(f"cannot reach {host} to download {url}; with no network use an offline backbone, "
                        "e.g. backbone=mobilenet_v2_100_224") from None
    return hub.resolve(url)


@keras.saving.register_keras_serializable(package="flowers")
class HubFeatureVector(keras.layers.Layer):
    """Float images in [0, 1], [batch, height, width, 3] -> feature vectors [batch, features]. `input_size`:
    the (height, width) the module expects, if known."""

    def __init__(self, handle: str, trainable: bool = False, train_batchnorm: bool = False, input_size=None,
                 **kwargs):
        super().__init__(trainable=trainable, **kwargs)
        self.handle = handle
        self.train_batchnorm = train_batchnorm
        self.input_size = tuple(input_size) if input_size else None
        self.module_path = resolve_handle(handle)
        self._module = tf.saved_model.load(self.module_path)
        trainable_refs = {v.ref() for v in self._module.trainable_variables}
        for variable in self._module.variables:
            name = variable.name.split(":")[0].replace("/", "_")
            self._track_variable(keras.Variable(variable, trainable=variable.ref() in trainable_refs, name=name))
        self.built = True

    def call(self, images, training=None):
        # Batch norm runs in training mode only when asked for: small batches ruin its statistics.
        return self._module(images, training=bool(training) and self.trainable and self.train_batchnorm)

    def get_config(self):
        return {**super().get_config(), "handle": self.handle, "train_batchnorm": self.train_batchnorm,
                "input_size": self.input_size}


def load_backbone(cfg: DictConfig) -> HubFeatureVector:
    """float32 under any precision policy: a SavedModel computes in the dtype it was saved with."""
    return HubFeatureVector(cfg.handle, trainable=cfg.trainable, train_batchnorm=cfg.train_batchnorm,
                            input_size=cfg.input_size, name=cfg.name, dtype="float32")
