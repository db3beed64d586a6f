"""Data: TFDS, an image folder or synthetic images -> tf.data splits of (encoded image, label).

Every source yields *encoded* image bytes. One function, `decode_and_resize`, turns them into pixels
for training, evaluation and the exported serving signature alike, so the three never drift apart. It also
resizes the image views of src/views.py, which are already decoded.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from PIL import Image

from src.config import UserError

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
# The first bytes of each format tf.io.decode_image reads.
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a")


@dataclass
class Splits:
    """Unbatched datasets of (encoded image bytes, int64 label), and what describes them. Besides the three splits,
    named samples of them (`with_sample`), e.g. the test images that robustness is measured on."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list[str]
    name: str
    version: str
    specs: dict[str, str]  # what each split or sample is in its source, e.g. {"train": "train[:50%]", ...}
    samples: dict[str, tf.data.Dataset] = field(default_factory=dict)

    def get(self, name: str) -> tf.data.Dataset:
        return getattr(self, name) if name in SPLITS else self.samples[name]

    def with_sample(self, name: str, split: str, per_class: int, seed: int) -> Splits:
        """These splits and `name`: a stratified sample of `split`, the same `per_class` images of each class
        (all of a class that has fewer) for a seed."""
        images = self.get(split)
        labels = np.fromiter(images.map(lambda _, label: label).as_numpy_iterator(), dtype=np.int64)
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                       for c in np.unique(labels)]))
        kept = tf.constant(keep, tf.int64)
        sample = images.enumerate().filter(lambda i, _: tf.reduce_any(tf.equal(i, kept))).map(lambda _, pair: pair)
        sample = sample.apply(tf.data.experimental.assert_cardinality(len(keep)))
        return replace(self, samples={**self.samples, name: sample},
                       specs={**self.specs, name: f"{self.specs[split]}:{per_class}_per_class:seed{seed}"})


def decode_and_resize(image: tf.Tensor, size) -> tf.Tensor | dict[str, tf.Tensor]:
    """JPEG/PNG/GIF/BMP/WebP bytes -> uint8 RGB image of `size` (height, width). Grey is repeated into RGB,
    CMYK converted, and transparent pixels are put on white, as a viewer shows them (dropping the alpha
    channel would show whatever colour hides under alpha 0). Only images with alpha leave uint8 before
    the resize, so a large photo costs one byte per channel and pixel. `size` may also be a dict of sizes by
    name (Network.image_sizes): then the image at each of them, by name, from one decode, each resized from the
    photo itself (a resize of a resize blurs). An image already decoded to uint8 RGB [height, width, 3] (an image
    view of src/views.py) is only resized."""
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, expand_animations=False)  # uint8, 1 to 4 channels
        image = tf.cond(tf.shape(image)[-1] % 2 == 0, lambda: _on_white(image), lambda: image)  # grey+alpha, RGBA
        image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    image = tf.ensure_shape(image, [None, None, 3])
    if isinstance(size, Mapping):
        return {name: _resize(image, each) for name, each in size.items()}
    return _resize(image, size)


def decode_batch(image_bytes: tf.Tensor, size) -> tf.Tensor | dict[str, tf.Tensor]:
    """A batch of encoded photos [batch] -> `decode_and_resize` of each, batched: uint8 [batch, height, width, 3],
    or a dict of them by name when `size` is a dict of sizes."""
    def spec(each):
        return tf.TensorSpec([*each, 3], tf.uint8)
    signature = {name: spec(each) for name, each in size.items()} if isinstance(size, Mapping) else spec(size)
    return tf.map_fn(lambda b: decode_and_resize(b, size), image_bytes, fn_output_signature=signature)


def _resize(image: tf.Tensor, size) -> tf.Tensor:
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _on_white(image: tf.Tensor) -> tf.Tensor:
    color, alpha = tf.cast(image[..., :-1], tf.float32), tf.cast(image[..., -1:], tf.float32) / 255.0
    return tf.cast(tf.round(color * alpha + 255.0 * (1.0 - alpha)), tf.uint8)


def decoding_fingerprint() -> str:
    """The code that turns image bytes into pixels, for the feature cache key."""
    return inspect.getsource(decode_and_resize) + inspect.getsource(_resize) + inspect.getsource(_on_white)


def make_batches(ds: tf.data.Dataset, size, batch_size: int, *, cache: bool = False,
                 shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Parallel decode + resize, optional in-memory cache, shuffle, batch, prefetch."""
    ds = ds.map(lambda image, label: (decode_and_resize(image, size), label), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(2048, seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def load_splits(cfg: DictConfig) -> Splits:
    loaders = {"tfds": _load_tfds, "image_folder": _load_image_folder, "synthetic": _load_synthetic}
    if cfg.source not in loaders:
        raise UserError(f"data.source={cfg.source!r} is unknown; use one of: {', '.join(loaders)}")
    return loaders[cfg.source](cfg)


# --- TensorFlow Datasets -------------------------------------------------------------------------

def _load_tfds(cfg: DictConfig) -> Splits:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"data.name={cfg.name!r} is not a TensorFlow Datasets dataset") from None
    if not builder.is_prepared():
        where = builder.data_dir
        fix = ("set TFDS_DATA_DIR or data.data_dir to a folder holding a prepared copy "
               "(offline: ../shared/tensorflow_datasets)")
        if not cfg.download:
            raise UserError(f"{cfg.name} is not prepared in {where}; {fix}, or set data.download=true")
        if not _reachable(builder):
            raise UserError(f"{cfg.name} is not prepared in {where} and there is no network to download it; {fix}")
        builder.download_and_prepare()
    datasets = {
        split: builder.as_dataset(split=cfg.splits[split], as_supervised=True, shuffle_files=False,
                                  decoders={"image": tfds.decode.SkipDecoding()})
        for split in SPLITS
    }
    return Splits(**datasets, class_names=list(builder.info.features["label"].names),
                  name=cfg.name, version=str(builder.info.version), specs=dict(cfg.splits))


def _reachable(builder, timeout: float = 5.0) -> bool:
    """Whether the dataset's download hosts answer. Offline, TFDS itself retries for minutes."""
    hosts = {urlparse(url).hostname for url in (builder.url_infos or {})}
    try:
        for host in hosts:
            socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --- <root>/<split>/<class>/*.jpg ----------------------------------------------------------------

def _load_image_folder(cfg: DictConfig) -> Splits:
    root = Path(cfg.root)
    train_dir = root / cfg.splits.train
    if not train_dir.is_dir():
        raise UserError(f"image folder {train_dir} does not exist; lay out images as {root}/<split>/<class>/*.jpg")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not class_names:
        raise UserError(f"{train_dir} holds no class folders; lay out images as {root}/<split>/<class>/*.jpg")
    datasets = {}
    for split in SPLITS:
        files, labels = _list_images(root / cfg.splits[split], class_names)
        datasets[split] = tf.data.Dataset.from_tensor_slices((files, labels)).map(
            lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=AUTOTUNE)
    return Splits(**datasets, class_names=class_names, name=f"image_folder:{root.name}", version=_folder_version(root),
                  specs=dict(cfg.splits))


def _list_images(split_dir: Path, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    if not split_dir.is_dir():
        raise UserError(f"image folder split {split_dir} does not exist; create it with one folder per class")
    files, labels = [], []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name not in class_names:
            raise UserError(f"class folder {class_dir} is not in the train split; add it there or remove it")
        for path in sorted(p for p in class_dir.iterdir() if p.is_file()):
            with path.open("rb") as f:
                head = f.read(8)
            if path.suffix.lower() not in IMAGE_SUFFIXES or not head.startswith(IMAGE_MAGIC):
                raise UserError(f"{path} is not a JPEG/PNG/BMP/GIF image; remove it from the image folder")
            files.append(str(path))
            labels.append(class_names.index(class_dir.name))
    if not files:
        raise UserError(f"{split_dir} holds no images; put them in {split_dir}/<class>/")
    return files, np.array(labels, dtype=np.int64)


def _folder_version(root: Path) -> str:
    """A fingerprint of the folder that changes when a file is added, removed, moved, renamed or rewritten."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --- synthetic ------------------------------------------------------------------------------------

SYNTHETIC_COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200),
                     "yellow": (220, 200, 40), "purple": (140, 50, 160), "orange": (240, 130, 30),
                     "cyan": (40, 190, 200), "grey": (128, 128, 128)}


def _load_synthetic(cfg: DictConfig) -> Splits:
    """Colour classes with noise, random sizes and a random darker square; learnable in one epoch."""
    if not 2 <= cfg.num_classes <= len(SYNTHETIC_COLOURS):
        raise UserError(f"data.num_classes={cfg.num_classes} is invalid: expected 2..{len(SYNTHETIC_COLOURS)}")
    class_names = list(SYNTHETIC_COLOURS)[: cfg.num_classes]
    rng = np.random.default_rng(0)
    datasets = {}
    for split in SPLITS:
        images, labels = [], []
        for label, name in enumerate(class_names):
            for _ in range(cfg.images_per_class[split]):
                images.append(_synthetic_jpeg(rng, SYNTHETIC_COLOURS[name], cfg.min_side, cfg.max_side))
                labels.append(label)
        datasets[split] = tf.data.Dataset.from_tensor_slices((images, np.array(labels, dtype=np.int64)))
    version = f"{cfg.num_classes}classes-{dict(cfg.images_per_class)}-{cfg.min_side}to{cfg.max_side}px"
    return Splits(**datasets, class_names=class_names, name="synthetic", version=version,
                  specs={split: split for split in SPLITS})


def _synthetic_jpeg(rng: np.random.Generator, colour, min_side: int, max_side: int) -> bytes:
    h, w = rng.integers(min_side, max_side + 1, size=2)
    pixels = np.array(colour, dtype=np.float32) * rng.uniform(0.7, 1.1) + rng.normal(0, 20, (h, w, 3))
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y: y + h // 3, x: x + w // 3] *= 0.5
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
