"""Views: fixed transforms of a batch of uint8 images, each the same size as the batch.

Test-time augmentation averages a model's probabilities over the views of `model.tta`; `model.train_views` adds
the views of each training image as extra examples, which the feature cache can hold.
"""

from __future__ import annotations

import inspect

import tensorflow as tf

from src.config import UserError

SETS = {"none": ("identity",), "flip": ("identity", "flip"), "crops": ("identity", "flip", "center", "center_flip")}
CENTER_FRACTION = 0.8


def parse_views(name: str, key: str) -> tuple[str, ...]:
    if name not in SETS:
        raise UserError(f"{key}={name!r} is unknown; use one of: {', '.join(SETS)}")
    return SETS[name]


def view(images: tf.Tensor, name: str) -> tf.Tensor:
    """`identity`, `flip` (horizontal), `center` (the central 80 %, resized back) or `center_flip`."""
    if name.startswith("center"):
        size = tf.shape(images)[1:3]
        cropped = tf.image.central_crop(images, CENTER_FRACTION)
        resized = tf.image.resize(cropped, size, method="bilinear", antialias=True)
        images = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    if name.endswith("flip"):
        images = tf.reverse(images, axis=[2])
    return images


def fingerprint(name: str) -> str | None:
    """What defines a view, for the feature cache key: None for the identity, else the code that makes it."""
    return None if name == "identity" else f"{name}:{CENTER_FRACTION}:{inspect.getsource(view)}"


def predict_views(model, images: tf.Tensor, views) -> tf.Tensor:
    """The mean of `model`'s outputs over the views of `images`."""
    return tf.reduce_mean(tf.stack([model(view(images, v), training=False) for v in views]), axis=0)
