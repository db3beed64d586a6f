"""Model: raw uint8 image (any size) -> resize + scale -> augmentation -> backbone(s) -> dropout -> softmax.

Several backbones each see the image at their own input size; their features are concatenated before the head.
Test-time augmentation averages the model's probabilities over fixed views of the image (VIEWS)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from omegaconf import DictConfig

from src.backbone import HubFeatureVector
from src.config import UserError


def build_augmentation(cfg: DictConfig, seed: int, name: str = "augmentation") -> keras.Sequential:
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
    return keras.Sequential(steps, name=name)


@keras.saving.register_keras_serializable(package="flowers")
class SplitUnitNormalization(keras.layers.Layer):
    """Unit-normalise each backbone's part of concatenated features, so that no backbone outweighs the others
    by the scale of its features. float32: a sum of squares overflows float16."""

    def __init__(self, dims, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.dims = [int(d) for d in dims]

    def call(self, features):
        parts = tf.split(tf.cast(features, "float32"), self.dims, axis=-1)
        return tf.concat([tf.math.l2_normalize(part, axis=-1, epsilon=1e-12) for part in parts], axis=-1)

    def get_config(self):
        return {**super().get_config(), "dims": self.dims}


def build_head(num_classes: int, cfg: DictConfig, feature_dims=()) -> keras.Sequential:
    """[unit-normalise features, each backbone's part on its own] -> dropout -> dense -> softmax. Under mixed
    precision the normalisation and the softmax stay float32."""
    normalize = []
    if cfg.normalize_features:
        normalize = [SplitUnitNormalization(feature_dims) if len(feature_dims) > 1
                     else layers.UnitNormalization(dtype="float32")]
    return keras.Sequential([*normalize, layers.Dropout(cfg.dropout), layers.Dense(num_classes),
                             layers.Activation("softmax", dtype="float32")], name="head")


def _resize_and_scale(x, input_size, suffix: str = ""):
    """float32 whatever the precision policy, so that cached features and the exported model see the same pixels."""
    x = layers.Resizing(*input_size, interpolation="bilinear", antialias=True, dtype="float32",
                        name=f"resize{suffix}")(x)
    return layers.Rescaling(1 / 255, dtype="float32", name=f"scale{suffix}")(x)


def _size_of(backbone: keras.layers.Layer, input_size) -> tuple[int, int]:
    """The backbone's own input size if it has one (a HubFeatureVector from a config), else the model's."""
    return tuple(getattr(backbone, "input_size", None) or input_size)


def _image_input():
    return keras.Input(shape=(None, None, 3), dtype="uint8", name="image")


def build_model(backbones, input_size, num_classes: int, cfg: DictConfig, seed: int,
                head: keras.Sequential | None = None) -> keras.Model:
    """The classifier that is trained end to end and exported. `backbones`: one backbone layer or a list, each
    fed at its own `input_size` (a HubFeatureVector attribute), else at the model's `input_size`. `head` may be
    one trained on cached features."""
    backbones = backbones if isinstance(backbones, (list, tuple)) else [backbones]
    images = _image_input()
    features = []
    for backbone in backbones:
        suffix = f"_{backbone.name}" if len(backbones) > 1 else ""
        x = _resize_and_scale(images, _size_of(backbone, input_size), suffix)
        if cfg.augmentation.enabled:  # one per backbone: each sees its own input size; the same seed
            x = build_augmentation(cfg.augmentation, seed, f"augmentation{suffix}")(x)
        features.append(backbone(x))
    dims = [int(f.shape[-1]) for f in features]
    x = layers.Concatenate(name="features")(features) if len(features) > 1 else features[0]
    probabilities = (head or build_head(num_classes, cfg, dims))(x)
    return keras.Model(images, probabilities, name="flower_classifier")


def build_feature_extractor(backbone: keras.layers.Layer, input_size) -> keras.Model:
    """uint8 image -> the backbone's features, through the same resize and scale as the classifier: images given
    at the model's input size are resized to the backbone's own."""
    images = _image_input()
    x = _resize_and_scale(images, _size_of(backbone, input_size))
    return keras.Model(images, backbone(x), name="feature_extractor")


def classify_resized(model: keras.Model, input_size):
    """`model` without its resize layers: uint8 images already at the input size (as `decode_and_resize` gives
    them) -> probabilities, one view. TFLite runs this: it has no antialiased resize op. So a backbone with a
    smaller input than the model's (several backbones) gets a plain bilinear resize here, and sees slightly
    different pixels than in the serving signature."""
    head = model.get_layer("head")
    backbones = [layer for layer in model.layers if isinstance(layer, HubFeatureVector)]

    def classify(images):
        x = tf.cast(images, "float32") * (1 / 255)  # as the Rescaling layer
        features = []
        for backbone in backbones:
            size = _size_of(backbone, input_size)
            resized = x if size == tuple(input_size) else tf.image.resize(x, size, method="bilinear")
            features.append(backbone(resized, training=False))
        return head(tf.concat(features, axis=-1) if len(features) > 1 else features[0], training=False)
    return classify


# Test-time augmentation: fixed views of a batch of uint8 images, each the same size as the batch.
TTA = {"none": ("identity",), "flip": ("identity", "flip"), "crops": ("identity", "flip", "center", "center_flip")}
CENTER_FRACTION = 0.8


def tta_views(name: str, key: str = "model.tta") -> tuple[str, ...]:
    if name not in TTA:
        raise UserError(f"{key}={name!r} is unknown; use one of: {', '.join(TTA)}")
    return TTA[name]


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


def predict_views(model: keras.Model, images: tf.Tensor, views) -> tf.Tensor:
    """The mean of `model`'s outputs over the views of `images`."""
    return tf.reduce_mean(tf.stack([model(view(images, v), training=False) for v in views]), axis=0)


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
