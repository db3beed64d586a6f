"""The random-view policy: what training for photos from elsewhere shows the model, one seeded draw at a time.

A random view of an image is a random resized crop (part of the photo, off centre, at another aspect), or, some
of the time, a zoom-out (the whole photo smaller in the frame, on a blurred enlargement of itself); then colour
jitter (brightness, contrast, saturation, colour temperature) and a mirror half of the time. The `broad` policy
adds what cameras and photographers do (model.view_policy): a turn of up to 30 degrees, and, a quarter of the time
each, a small photo scaled back up, a blur, and heavy JPEG compression. The same function makes the feature
cache's `model.train_views=random:K` (K fixed draws per training image, seeded by the image's index) and
fine-tuning's end-to-end augmentation (a fresh draw per image and step).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass

import keras
import tensorflow as tf

from src import shifts


@dataclass(frozen=True)
class Policy:
    crop_area: tuple[float, float] = (0.25, 1.0)  # of the image's area
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    zoom_out: float = 0.3  # how often the view is a zoom-out instead of a crop
    zoom_out_scale: tuple[float, float] = (0.45, 0.9)  # the photo's side in the frame
    brightness: float = 0.3  # up or down by at most this fraction
    contrast: float = 0.3
    saturation: float = 0.4
    temperature: float = 0.15  # red and blue scaled apart by at most this fraction
    flip: float = 0.5
    rotation: float = 0.0  # degrees, either way
    low_resolution: float = 0.0  # how often the photo is small (its short side in low_resolution_side pixels)
    low_resolution_side: tuple[float, float] = (40.0, 128.0)
    blur: float = 0.0  # how often the view is blurred, by a Gaussian of sigma in blur_sigma pixels
    blur_sigma: tuple[float, float] = (0.5, 3.0)
    jpeg: float = 0.0  # how often the view is saved as a JPEG of a quality in jpeg_quality
    jpeg_quality: tuple[int, int] = (10, 60)

    def fingerprint(self) -> str:
        """What defines the views, for the feature cache key: the settings and the code."""
        code = [random_view, _zoom_out, _crop, _jitter, _camera, shifts.rotate, shifts.gaussian_blur]
        return json.dumps(asdict(self)) + "".join(inspect.getsource(f) for f in code)


POLICIES = {"standard": Policy(),
            "broad": Policy(rotation=30.0, low_resolution=0.25, blur=0.25, jpeg=0.25)}
POLICY = POLICIES["standard"]


def random_view(image: tf.Tensor, seed: tf.Tensor, policy: Policy = POLICY) -> tf.Tensor:
    """One random view of one image ([height, width, 3], uint8 or float in [0, 255] or [0, 1]), of the same size
    and dtype, drawn from the stateless generator `seed` (two integers)."""
    dtype = image.dtype
    x = tf.cast(image, tf.float32)
    top = 255.0 if dtype == tf.uint8 else 1.0
    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    # the broad policy's draws come from a generator of their own, so the standard policy's views stay as cached
    extra = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, 1), 4)
    x = tf.cond(tf.random.stateless_uniform([], seeds[0]) < policy.zoom_out,
                lambda: _zoom_out(x, seeds[1], policy), lambda: _crop(x, seeds[1], policy))
    if policy.rotation:
        degrees = tf.random.stateless_uniform([], extra[0], -policy.rotation, policy.rotation)
        x = shifts.rotate(x, degrees * math.pi / 180)
    x = _jitter(x / top, seeds[2], policy) * top
    x = tf.cond(tf.random.stateless_uniform([], seeds[3]) < policy.flip, lambda: tf.reverse(x, axis=[1]), lambda: x)
    if policy.low_resolution or policy.blur or policy.jpeg:
        x = _camera(x / top, extra[1:], policy) * top
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), dtype) if dtype == tf.uint8 else tf.clip_by_value(x, 0, top)


def _crop(x, seed, policy: Policy):
    shape = tf.shape(x)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    draws = tf.random.stateless_uniform([4], seed)
    area = policy.crop_area[0] + draws[0] * (policy.crop_area[1] - policy.crop_area[0])
    log_low, log_high = tf.math.log(policy.crop_aspect[0]), tf.math.log(policy.crop_aspect[1])
    aspect = tf.exp(log_low + draws[1] * (log_high - log_low))
    crop_h = tf.clip_by_value(tf.sqrt(area / aspect) * height, 1.0, height)
    crop_w = tf.clip_by_value(tf.sqrt(area * aspect) * width, 1.0, width)
    top = tf.cast(draws[2] * (height - crop_h), tf.int32)
    left = tf.cast(draws[3] * (width - crop_w), tf.int32)
    crop = x[top:top + tf.cast(crop_h, tf.int32), left:left + tf.cast(crop_w, tf.int32)]
    return tf.image.resize(crop, shape[:2], method="bilinear", antialias=True)


def _zoom_out(x, seed, policy: Policy):
    shape = tf.shape(x)
    draws = tf.random.stateless_uniform([3], seed)
    scale = policy.zoom_out_scale[0] + draws[0] * (policy.zoom_out_scale[1] - policy.zoom_out_scale[0])
    inner_size = tf.maximum(tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32), 1)
    inner = tf.image.resize(x, inner_size, method="bilinear", antialias=True)
    top = tf.cast(draws[1] * tf.cast(shape[0] - inner_size[0], tf.float32), tf.int32)
    left = tf.cast(draws[2] * tf.cast(shape[1] - inner_size[1], tf.float32), tf.int32)
    paddings = [[top, shape[0] - inner_size[0] - top], [left, shape[1] - inner_size[1] - left], [0, 0]]
    mask = tf.pad(tf.ones(tf.concat([inner_size, [1]], 0)), paddings)
    surround = tf.image.resize(tf.image.resize(x, (4, 4), method="area"), shape[:2], method="bilinear")
    return tf.pad(inner, paddings) * mask + surround * (1 - mask)


def _jitter(x, seed, policy: Policy):
    """Colour jitter of an image in [0, 1]."""
    draws = tf.random.stateless_uniform([4], seed, minval=-1.0, maxval=1.0)
    x = x * (1 + policy.brightness * draws[0])
    mean = tf.reduce_mean(x)
    x = (x - mean) * (1 + policy.contrast * draws[1]) + mean
    grey = tf.reduce_mean(x, axis=-1, keepdims=True)
    x = (x - grey) * (1 + policy.saturation * draws[2]) + grey
    warmth = policy.temperature * draws[3]
    return x * tf.stack([1 + warmth, 1.0, 1 - warmth])


def _camera(x, seeds, policy: Policy):
    """A small photo scaled back up, a blur, a JPEG: each some of the time, on an image in [0, 1]."""
    shape = tf.shape(x)
    happens = tf.random.stateless_uniform([3], seeds[0])
    amounts = tf.random.stateless_uniform([3], seeds[1])

    def amount(i, bounds):
        return bounds[0] + amounts[i] * (bounds[1] - bounds[0])

    def small(x):
        scale = amount(0, policy.low_resolution_side) / tf.cast(tf.reduce_min(shape[:2]), tf.float32)
        size = tf.maximum(tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * tf.minimum(scale, 1.0)), tf.int32), 1)
        smaller = tf.image.resize(x, size, method="bilinear", antialias=True)
        return tf.image.resize(smaller, shape[:2], method="bilinear")

    def blurred(x):
        return shifts.gaussian_blur(x, amount(1, policy.blur_sigma), radius=int(3 * policy.blur_sigma[1]))

    def compressed(x):
        quality = tf.cast(tf.round(amount(2, policy.jpeg_quality)), tf.int32)
        return tf.reshape(tf.image.adjust_jpeg_quality(tf.clip_by_value(x, 0.0, 1.0), quality), shape)

    steps = ((policy.low_resolution, small), (policy.blur, blurred), (policy.jpeg, compressed))
    for i, (often, change) in enumerate(steps):
        if often:
            x = tf.cond(happens[i] < often, lambda change=change, x=x: change(x), lambda x=x: x)
    return x


@keras.saving.register_keras_serializable(package="flowers")
class RandomViews(keras.layers.Layer):
    """Fine-tuning's augmentation: a fresh random view of each image of the batch in training; the identity
    outside training. On [0, 1] float images."""

    def __init__(self, seed: int = 0, policy: str = "standard", **kwargs):
        super().__init__(**kwargs)
        self.seed, self.policy = seed, policy
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        base = keras.random.randint([2], 0, 2**30, seed=self.seed_generator)
        count = tf.shape(images)[0]
        seeds = tf.stack([tf.fill([count], tf.cast(base[0], tf.int64)),
                          tf.cast(tf.range(count), tf.int64) + tf.cast(base[1], tf.int64)], axis=1)
        return tf.map_fn(lambda pair: random_view(pair[0], pair[1], POLICIES[self.policy]), (images, seeds),
                         fn_output_signature=tf.TensorSpec(images.shape[1:], images.dtype))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, "policy": self.policy}
