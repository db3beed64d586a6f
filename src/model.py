"""Model: raw uint8 image (any size) -> resize + scale -> augmentation -> backbone -> dropout -> softmax."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from omegaconf import DictConfig

from src.backbone import HubFeatureVector


def build_augmentation(cfg: DictConfig, seed: int) -> keras.Sequential:
    """Random flip, rotation, zoom and contrast on [0, 1] images; identity outside training."""
    steps = []
    if cfg.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation:
        steps.append(layers.RandomRotation(cfg.rotation, seed=seed))
    if cfg.zoom:
        steps.append(layers.RandomZoom(cfg.zoom, seed=seed))
    if cfg.contrast:
        steps.append(layers.RandomContrast(cfg.contrast, value_range=(0, 1), seed=seed))
    return keras.Sequential(steps, name="augmentation")


def build_head(num_classes: int, cfg: DictConfig) -> keras.Sequential:
    """[unit-normalise features] -> dropout -> dense -> softmax. Under mixed precision the normalisation (a sum of
    squares that overflows float16) and the softmax stay float32."""
    normalize = [layers.UnitNormalization(dtype="float32")] if cfg.normalize_features else []
    return keras.Sequential([*normalize, layers.Dropout(cfg.dropout), layers.Dense(num_classes),
                             layers.Activation("softmax", dtype="float32")], name="head")


def _resized_and_scaled(input_size):
    """float32 whatever the precision policy, so that cached features and the exported model see the same pixels."""
    images = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    x = layers.Resizing(*input_size, interpolation="bilinear", antialias=True, dtype="float32", name="resize")(images)
    return images, layers.Rescaling(1 / 255, dtype="float32", name="scale")(x)


def build_model(backbone: keras.layers.Layer, input_size, num_classes: int, cfg: DictConfig, seed: int,
                head: keras.Sequential | None = None) -> keras.Model:
    """The classifier that is trained end to end and exported. `head` may be one trained on cached features."""
    images, x = _resized_and_scaled(input_size)
    if cfg.augmentation.enabled:
        x = build_augmentation(cfg.augmentation, seed)(x)
    features = backbone(x)
    probabilities = (head or build_head(num_classes, cfg))(features)
    return keras.Model(images, probabilities, name="flower_classifier")


def build_feature_extractor(backbone: keras.layers.Layer, input_size) -> keras.Model:
    """uint8 image -> the backbone's features, through the same resize and scale as the classifier."""
    images, x = _resized_and_scaled(input_size)
    return keras.Model(images, backbone(x), name="feature_extractor")


def classify_resized(model: keras.Model):
    """`model` without its resize layer: uint8 images already at the input size (as `decode_and_resize` gives
    them) -> probabilities. TFLite runs this: it has no antialiased resize op."""
    scale, head = model.get_layer("scale"), model.get_layer("head")
    backbone = next(layer for layer in model.layers if isinstance(layer, HubFeatureVector))
    return lambda images: head(backbone(scale(images), training=False), training=False)


def predict_batches(model: keras.Model, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, labels) of `model` over `batches` of (inputs, labels), in order. A plain call in one graph, not
    predict_on_batch: under a MirroredStrategy that returns each replica's outputs for the whole batch, stacked
    (twice the rows on two devices)."""
    predict = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)
    outputs, labels = [], []
    for inputs, batch_labels in batches:
        outputs.append(predict(inputs).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(outputs), np.concatenate(labels)
