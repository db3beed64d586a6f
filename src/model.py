"""Model: raw uint8 image (any size) -> resize + scale -> [augmentation] -> backbone(s) -> head -> probabilities.

`Network` is the one forward graph: the backbones, in their order, and the preprocessing that feeds each of them
at its own input size. Backbones of different input sizes each get the photo decoded at their own size: the
model then takes one image per size, by name (`Network.image_sizes`), since a photo decoded at the largest size
and resized again for a smaller backbone is blurred twice (experiments/beyond_frozen/PROTOCOL.md, amendment 3:
8 of 1,020 validation images for logistic regression on the four offline backbones). It builds the
trainable classifier, the feature extractor whose outputs the feature cache keeps, and `classify_resized`, which
TFLite and OpenVINO convert. Several backbones' features are concatenated before one head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from src import data
from src.augment import RandomViews
from src.spec import Augmentation, Head


def build_augmentation(cfg: Augmentation, seed: int, name: str = "augmentation") -> keras.Sequential:
    """Random flip, rotation, zoom and contrast on [0, 1] images, or the random-view policy; identity outside
    training."""
    if cfg.random_views:
        return keras.Sequential([RandomViews(seed, cfg.view_policy)], name=name)
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


def normalization(widths: Sequence[int]) -> keras.layers.Layer:
    """Unit-normalise features, each backbone's part on its own."""
    return SplitUnitNormalization(widths) if len(widths) > 1 else layers.UnitNormalization(dtype="float32")


def build_head(num_classes: int, cfg: Head, widths: Sequence[int]) -> keras.Sequential:
    """[unit-normalise features] -> dropout -> dense -> softmax, built for features of `widths` (one per backbone).
    Under mixed precision the normalisation and the softmax stay float32."""
    normalize = [normalization(widths)] if cfg.normalize_features else []
    head = keras.Sequential([*normalize, layers.Dropout(cfg.dropout), layers.Dense(num_classes),
                             layers.Activation("softmax", dtype="float32")], name="head")
    head.build((None, sum(widths)))
    return head


def _image_input(name: str = "image"):
    return keras.Input(shape=(None, None, 3), dtype="uint8", name=name)


def images_name(size) -> str:
    """The name of the model's input at `size`, when it has one per size: images_224x224."""
    return f"images_{size[0]}x{size[1]}"


class Network:
    """The backbones and how an image reaches each of them: decoded at the backbone's input size (`input_size` for
    a backbone that has none), then resized to that size again (a no-op for decoded images, the resize for raw ones)
    and scaled to [0, 1]."""

    def __init__(self, backbones: Sequence[keras.layers.Layer], input_size):
        self.backbones = list(backbones)
        self.input_size = tuple(input_size)

    @functools.cached_property
    def image_sizes(self) -> tuple[int, int] | dict[str, tuple[int, int]]:
        """What images are decoded to for this network (`data.decode_and_resize`'s `size`): one (height, width)
        when every backbone takes the same size, else each size by its input's name (`images_name`)."""
        sizes = list(dict.fromkeys(self.size_of(b) for b in self.backbones))
        return sizes[0] if len(sizes) == 1 else {images_name(size): size for size in sizes}

    def image_of(self, images, backbone: keras.layers.Layer):
        """The backbone's image out of the network's images (one tensor, or a dict by size)."""
        return images[images_name(self.size_of(backbone))] if isinstance(images, dict) else images

    def inputs(self):
        """The model's uint8 input(s), of any size: one, or one per input size by name."""
        if not isinstance(self.image_sizes, dict):
            return _image_input()
        return {name: _image_input(name) for name in self.image_sizes}

    @functools.cached_property
    def widths(self) -> list[int]:
        """Each backbone's number of features."""
        return [int(f.shape[-1]) for f in self.features(self.inputs())]

    def size_of(self, backbone: keras.layers.Layer) -> tuple[int, int]:
        """The backbone's own input size if it has one (a HubFeatureVector from a config), else the model's."""
        return tuple(getattr(backbone, "input_size", None) or self.input_size)

    def preprocessing(self, backbone: keras.layers.Layer) -> list[keras.layers.Layer]:
        """float32 whatever the precision policy, so that cached features and the exported model see the same
        pixels."""
        suffix = f"_{backbone.name}" if len(self.backbones) > 1 else ""
        return [layers.Resizing(*self.size_of(backbone), interpolation="bilinear", antialias=True, dtype="float32",
                                name=f"resize{suffix}"),
                layers.Rescaling(1 / 255, dtype="float32", name=f"scale{suffix}")]

    def fingerprint(self, backbone: keras.layers.Layer) -> dict:
        """Everything between encoded image bytes and the backbone, for the feature cache key: the decoding code
        and the preprocessing layers' settings."""
        settings = [{k: v for k, v in layer.get_config().items() if k != "name"} for layer in self.preprocessing(backbone)]
        return {"decode": data.decoding_fingerprint(), "layers": settings}

    def features(self, images, augmentation: Augmentation | None = None, seed: int = 0) -> list:
        """Each backbone's features of `images`, in the backbones' order."""
        features = []
        for backbone in self.backbones:
            x = self.image_of(images, backbone)
            for layer in self.preprocessing(backbone):
                x = layer(x)
            if augmentation is not None and augmentation.enabled:  # one per backbone, each at its own size
                suffix = f"_{backbone.name}" if len(self.backbones) > 1 else ""
                x = build_augmentation(augmentation, seed, f"augmentation{suffix}")(x)
            features.append(backbone(x))
        return features

    def classifier(self, head: keras.Sequential, augmentation: Augmentation | None = None,
                   seed: int = 0) -> keras.Model:
        """uint8 image(s) -> probabilities: what is trained end to end and exported."""
        images = self.inputs()
        features = self.features(images, augmentation, seed)
        x = layers.Concatenate(name="features")(features) if len(features) > 1 else features[0]
        return keras.Model(images, head(x), name="flower_classifier")

    def extractor(self) -> keras.Model:
        """uint8 image(s) -> each backbone's features, by its name."""
        images = self.inputs()
        outputs = dict(zip((b.name for b in self.backbones), self.features(images)))
        return keras.Model(images, outputs, name="feature_extractor")

    def classify_resized(self, head: keras.layers.Layer):
        """The classifier without its resize layers: uint8 images already at their decoded size (as
        `decode_and_resize` gives them at `image_sizes`) -> probabilities, one view. TFLite runs this: it has no
        antialiased resize op."""
        def classify(images):
            features = []
            for backbone in self.backbones:
                x = tf.cast(self.image_of(images, backbone), "float32") * (1 / 255)  # as the Rescaling layer
                features.append(backbone(x, training=False))
            return head(tf.concat(features, axis=-1) if len(features) > 1 else features[0], training=False)
        return classify


def predict_batches(model, batches: tf.data.Dataset, progress=None) -> tuple:
    """(outputs, labels) of `model` over `batches` of (inputs, labels), in order. A plain call in one graph, not
    predict_on_batch: under a MirroredStrategy that returns each replica's outputs for the whole batch, stacked
    (twice the rows on two devices). The outputs have the model's structure: an array, or a dict of them.
    `progress`: called with each batch's size."""
    predict = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)
    outputs, labels = [], []
    for inputs, batch_labels in batches:
        outputs.append(tf.nest.map_structure(lambda t: t.numpy(), predict(inputs)))
        labels.append(batch_labels.numpy())
        if progress is not None:
            progress(len(labels[-1]))
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *outputs), np.concatenate(labels)
