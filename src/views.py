"""Views of an image: what test-time augmentation averages over, what training adds as examples, and the shifted
images that robustness is measured on.

Two kinds:
- **Fixed views** transform a batch of uint8 images already at the model's input size, the same way for every
  image: `identity`, `flip`, `center` (the central 80 %, resized back), `center_flip`, `wide` (the image at 80 % of
  its side on a blurred enlargement of itself: the flower a little smaller in the frame), `wide_flip`. The served
  model runs them inside its SavedModel.
- **Image views** transform one decoded photo at its own size, before the model's resize, drawn per image from a
  generator seeded by the image's index: `random<k>` (the k-th random view of src/augment.py's standard policy;
  `random<k>-<policy>` of another policy) and
  `shift:<shift>:<severity>` (src/shifts.py). The result stays a decoded uint8 image and goes straight to
  `decode_and_resize`'s resize: the same pixels as a lossless PNG of it, decoded as any photo is, so its features
  are those a served model computes for that image, without the encoding's cost. They feed the feature cache only.

`model.tta` names a set of fixed views; `model.train_views` a set, or `random:K` (the image and K random views).
"""

from __future__ import annotations

import inspect

import tensorflow as tf

from src import augment, shifts
from src.config import UserError

SETS = {"none": ("identity",), "flip": ("identity", "flip"), "crops": ("identity", "flip", "center", "center_flip"),
        "multiscale": ("identity", "flip", "center", "wide")}
CENTER_FRACTION = 0.8
WIDE_FRACTION = 0.8
MAX_RANDOM = 64


def parse_views(name: str, key: str, random: bool = False, policy: str = "standard") -> tuple[str, ...]:
    """The views a setting names; `random:K` (when `random`) is the image and K random views of `policy`."""
    if random and str(name).startswith("random:"):
        count = str(name).removeprefix("random:")
        if not count.isdigit() or not 1 <= int(count) <= MAX_RANDOM:
            raise UserError(f"{key}={name!r} is invalid: expected random:K with K from 1 to {MAX_RANDOM}, e.g. random:8")
        suffix = "" if policy == "standard" else f"-{policy}"
        return ("identity", *(f"random{k}{suffix}" for k in range(int(count))))
    if name not in SETS:
        choices = [*SETS, "random:K"] if random else list(SETS)
        raise UserError(f"{key}={name!r} is unknown; use one of: {', '.join(choices)}")
    return SETS[name]


def is_image_view(name: str) -> bool:
    return name.startswith(("random", "shift:"))


def split_view(name: str) -> tuple[str | None, str]:
    """A view's image part (or None) and its fixed part: `shift:blur:2+flip` is the blurred photo, mirrored."""
    if not is_image_view(name):
        return None, name
    image, _, fixed = name.partition("+")
    return image, fixed or "identity"


def viewed_images(images: tf.data.Dataset, name: str, seed: int) -> tf.data.Dataset:
    """(encoded image, label) pairs -> (decoded uint8 image [height, width, 3], label) pairs, each photo in the image
    view `name` (its index in `images` seeds its draws)."""
    return images.enumerate().map(lambda i, pair: (image_view(pair[0], name, i, seed), pair[1]),
                                  num_parallel_calls=tf.data.AUTOTUNE)


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


def fixed_view(images: tf.Tensor, name: str) -> tf.Tensor:
    """A fixed view of a batch of uint8 images [batch, height, width, 3]: `wide` and `wide_flip` here, the others
    in `view` (whose code the feature cache key reads, so it stays as the cached features were made)."""
    if name.startswith("wide"):
        wide = _wide(images, tf.shape(images)[1:3])
        return view(tf.cast(tf.clip_by_value(tf.round(wide), 0, 255), tf.uint8), name.replace("wide", "identity"))
    return view(images, name)


def _wide(images: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """The images at WIDE_FRACTION of their side, centred on a blurred enlargement of themselves."""
    x = tf.cast(images, tf.float32)
    inner = tf.cast(tf.round(tf.cast(size, tf.float32) * WIDE_FRACTION), tf.int32)
    small = tf.image.resize(x, inner, method="bilinear", antialias=True)
    top, left = (size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2
    paddings = [[0, 0], [top, size[0] - inner[0] - top], [left, size[1] - inner[1] - left], [0, 0]]
    mask = tf.pad(tf.ones_like(small[..., :1]), paddings)
    surround = tf.image.resize(tf.image.resize(x, (4, 4), method="area"), size, method="bilinear")
    return tf.pad(small, paddings) * mask + surround * (1 - mask)


def image_view(image_bytes: tf.Tensor, name: str, index, seed: int) -> tf.Tensor:
    """An image view of one encoded photo, the `index`-th of its split, as a uint8 image [height, width, 3]."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    if name.startswith("shift:"):
        return shifts.apply(image, name.removeprefix("shift:"), index, seed=shifts.SEED)
    k, policy = _random_view(name)
    return augment.random_view(image, tf.stack([tf.cast(seed * 1000 + k, tf.int64), tf.cast(index, tf.int64)]),
                               augment.POLICIES[policy])


def _random_view(name: str) -> tuple[int, str]:
    """`random3` -> (3, "standard"); `random3-broad` -> (3, "broad")."""
    k, _, policy = name.removeprefix("random").partition("-")
    return int(k), policy or "standard"


def fingerprint(name: str, seed: int = 0) -> str | None:
    """What defines a view, for the feature cache key: None for the identity, else the code (and the seed) that
    makes it."""
    image, fixed = split_view(name)
    if image is not None and fixed != "identity":
        return f"{fingerprint(image, seed)}+{fingerprint(fixed)}"
    if name == "identity":
        return None
    if name.startswith("shift:"):
        shift = name.split(":")[1]
        helpers = "".join(inspect.getsource(f) for f in (shifts.apply, shifts.rotate, shifts.gaussian_blur))
        return f"{name}:{shifts.SEED}:{inspect.getsource(shifts.SHIFTS[shift])}{helpers}"
    if name.startswith("random"):
        policy = augment.POLICIES[_random_view(name)[1]]
        return f"{name}:seed{seed}:{policy.fingerprint()}{inspect.getsource(image_view)}"
    if name.startswith("wide"):
        return f"{name}:{WIDE_FRACTION}:{inspect.getsource(_wide)}{inspect.getsource(view)}"
    return f"{name}:{CENTER_FRACTION}:{inspect.getsource(view)}"


def fixed_views(images, name: str):
    """`fixed_view` of a model's images: one batch, or a dict of them by size (Network.image_sizes)."""
    return tf.nest.map_structure(lambda each: fixed_view(each, name), images)


def predict_views(model, images, views) -> tf.Tensor:
    """The mean of `model`'s outputs over the fixed views of `images` (one batch, or a dict of them by size)."""
    return tf.reduce_mean(tf.stack([model(fixed_views(images, v), training=False) for v in views]), axis=0)
