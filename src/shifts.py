"""Shifts: what photos from elsewhere do to an image, at three severities each, seeded and deterministic.

A shift takes a decoded uint8 image at its own size (what `decode_and_resize` decodes from the bytes, before it
resizes) and returns another uint8 image, as if that had been the photo sent. So a shifted image can be encoded
losslessly (PNG) and sent to a served model, which then sees exactly these pixels; and the feature cache can
hold the features of shifted images, computed the same way.

Each shift draws what it needs (a position, a direction) from a stateless generator seeded by (seed, image
index): the same image gets the same shift every time, whatever the batch or the order.
"""

from __future__ import annotations

import math

import tensorflow as tf

SEVERITIES = (1, 2, 3)
SEED = 1234  # the shifted sets are one fixed sample: every model sees the same shifted images


def _uniform(seed, index, salt: int, shape=()):
    return tf.random.stateless_uniform(shape, tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64) * 101 + salt]))


def _float(image):
    return tf.cast(image, tf.float32)


def _uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _size(image):
    shape = tf.shape(image)
    return shape[0], shape[1]


def _blurred_enlargement(image):
    """The image itself, shrunk to a few pixels and grown back: a soft, plausibly coloured surround."""
    height, width = _size(image)
    small = tf.image.resize(_float(image), (4, 4), method="area")
    return tf.image.resize(small, (height, width), method="bilinear")


def zoom_out(image, severity, seed, index):
    """The flower smaller in the frame: the image scaled down to 75, 55 or 40 % of its side and placed, at a seeded
    position, on a blurred enlargement of itself."""
    scale = (0.75, 0.55, 0.4)[severity - 1]
    height, width = _size(image)
    inner_h = tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32)
    inner_w = tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32)
    inner = tf.image.resize(_float(image), (inner_h, inner_w), method="bilinear", antialias=True)
    where = _uniform(seed, index, 1, [2])
    top = tf.cast(where[0] * tf.cast(height - inner_h, tf.float32), tf.int32)
    left = tf.cast(where[1] * tf.cast(width - inner_w, tf.float32), tf.int32)
    placed = tf.pad(inner, [[top, height - inner_h - top], [left, width - inner_w - left], [0, 0]])
    mask = tf.pad(tf.ones((inner_h, inner_w, 1)), [[top, height - inner_h - top], [left, width - inner_w - left], [0, 0]])
    return _uint8(placed * mask + _blurred_enlargement(image) * (1 - mask))


def off_centre(image, severity, seed, index):
    """A crop of 60, 40 or 25 % of the area, away from the centre (its corner in the outer quarters of the
    range on each axis, seeded), resized back to the image's size."""
    area = (0.6, 0.4, 0.25)[severity - 1]
    height, width = _size(image)
    crop_h = tf.cast(tf.cast(height, tf.float32) * math.sqrt(area), tf.int32)
    crop_w = tf.cast(tf.cast(width, tf.float32) * math.sqrt(area), tf.int32)
    draw = _uniform(seed, index, 2, [2])
    outer = tf.where(draw < 0.5, draw * 0.5, 0.5 + draw * 0.5)  # [0, 0.25) or [0.75, 1)
    top = tf.cast(outer[0] * tf.cast(height - crop_h, tf.float32), tf.int32)
    left = tf.cast(outer[1] * tf.cast(width - crop_w, tf.float32), tf.int32)
    crop = image[top:top + crop_h, left:left + crop_w]
    return _uint8(tf.image.resize(_float(crop), (height, width), method="bilinear", antialias=True))


def rotation(image, severity, seed, index):
    """Turned by 15, 30 or 45 degrees, either way (seeded), the corners filled by reflection."""
    degrees = (15.0, 30.0, 45.0)[severity - 1]
    sign = tf.where(_uniform(seed, index, 3) < 0.5, -1.0, 1.0)
    return _uint8(rotate(_float(image), sign * degrees * math.pi / 180))


def rotate(x, angle):
    """A float image [height, width, 3] turned by `angle` radians about its centre, the corners filled by
    reflection."""
    height, width = _size(x)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # the projective transform maps output pixels to input pixels: a rotation about the centre
    x_offset = (w - 1) / 2 - (cos * (w - 1) / 2 - sin * (h - 1) / 2)
    y_offset = (h - 1) / 2 - (sin * (w - 1) / 2 + cos * (h - 1) / 2)
    transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[None]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform, output_shape=tf.stack([height, width]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0]


def colour_temperature(image, severity, seed, index):
    """Warmer or cooler light (seeded): red and blue scaled apart by 10, 20 or 30 %."""
    amount = (0.1, 0.2, 0.3)[severity - 1]
    warm = _uniform(seed, index, 4) < 0.5
    gains = tf.where(warm, tf.constant([1 + amount, 1.0, 1 - amount]), tf.constant([1 - amount, 1.0, 1 + amount]))
    return _uint8(_float(image) * gains)


def brightness_contrast(image, severity, seed, index):
    """Contrast cut to 70, 50 or 35 % about the mean, then the image darker (to the same fractions) or brighter
    (by 1.3, 1.6 or 1.9 times), seeded."""
    contrast = (0.7, 0.5, 0.35)[severity - 1]
    brighter = (1.3, 1.6, 1.9)[severity - 1]
    x = _float(image)
    mean = tf.reduce_mean(x)
    x = (x - mean) * contrast + mean
    gain = tf.where(_uniform(seed, index, 5) < 0.5, contrast, brighter)
    return _uint8(x * gain)


def blur(image, severity, seed, index):
    """A Gaussian blur of sigma 1.5, 3 or 5 pixels (at the photo's own size, about 256 pixels on the short side)."""
    sigma = (1.5, 3.0, 5.0)[severity - 1]
    return _uint8(gaussian_blur(_float(image), sigma, radius=int(3 * sigma)))


def gaussian_blur(x, sigma, radius: int):
    """A float image [height, width, 3] blurred by a Gaussian of `sigma` pixels (a number or a tensor), cut at
    `radius` pixels, the edges mirrored."""
    taps = tf.exp(-tf.square(tf.range(-radius, radius + 1, dtype=tf.float32)) / (2 * tf.square(sigma)))
    taps /= tf.reduce_sum(taps)
    x = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    kernel_h = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, 3, 1])
    kernel_w = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, 3, 1])
    x = tf.nn.depthwise_conv2d(x, kernel_h, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(x, kernel_w, [1, 1, 1, 1], "VALID")[0]


def jpeg(image, severity, seed, index):
    """Saved again as a JPEG of quality 25, 12 or 6."""
    quality = (25, 12, 6)[severity - 1]
    return tf.io.decode_jpeg(tf.io.encode_jpeg(image, quality=quality), channels=3)


def low_resolution(image, severity, seed, index):
    """A small photo: the short side brought down to 96, 64 or 40 pixels (the model then scales it up)."""
    short = (96.0, 64.0, 40.0)[severity - 1]
    height, width = _size(image)
    scale = short / tf.cast(tf.minimum(height, width), tf.float32)
    size = tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float32) * scale), tf.int32)
    return _uint8(tf.image.resize(_float(image), size, method="bilinear", antialias=True))


SHIFTS = {f.__name__: f for f in (zoom_out, off_centre, rotation, colour_temperature, brightness_contrast, blur, jpeg,
                                   low_resolution)}
CONDITIONS = tuple(f"{name}:{severity}" for name in SHIFTS for severity in SEVERITIES)


def apply(image: tf.Tensor, condition: str, index, seed: int = SEED) -> tf.Tensor:
    """The shift `condition` ("<shift>:<severity>", e.g. "blur:2") of one decoded uint8 image, the `index`-th of its
    set."""
    name, severity = condition.split(":")
    return SHIFTS[name](tf.ensure_shape(image, [None, None, 3]), int(severity), seed, index)
