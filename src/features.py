"""Feature cache: frozen backbones' features of each split's images, computed once and kept on disk.

With the backbones frozen and augmentation off, every epoch of every trial would push the same images through the
same backbones. Here they go through once, per backbone, split and view; heads then train on the cached features
in seconds. The key covers everything that changes the features: the backbone's files and input size, the size
images are decoded to, the dataset, its version and split, the view, the TensorFlow version, and the
preprocessing the `Network` applies (its layers' settings and the decoding code, read from them rather than
written by hand). So a change gets new features rather than stale ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.model_selection import StratifiedKFold

from src import files, progress
from src.data import Splits, make_batches
from src.model import Network, predict_batches
from src.views import fingerprint as view_fingerprint, fixed_views, split_view, viewed_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """Every backbone's features side by side, in the network's order, for each split's images in each view."""

    arrays: Mapping[tuple[str, str], np.ndarray]  # (split, view) -> [images, sum(widths)]
    labels: Mapping[str, np.ndarray]  # split -> [images], in the split's order
    widths: tuple[int, ...]  # each backbone's number of features

    def get(self, split: str, view_name: str = "identity") -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[split, view_name], self.labels[split]

    def stack(self, splits: Sequence[str], views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Training examples: each image of `splits` in each of `views`."""
        parts = [self.get(split, v) for split in splits for v in views]
        return np.concatenate([f for f, _ in parts]), np.concatenate([labels for _, labels in parts])

    def folds(self, k: int, seed: int, views: Sequence[str]) -> list[Features]:
        """Cross-validation on train + validation: k Features, one per fold, whose `train` is the other folds'
        images in every one of `views` and whose `validation` is the fold's images (one view)."""
        pooled = {v: np.concatenate([self.arrays["train", v], self.arrays["validation", v]]) for v in views}
        pooled["identity"] = np.concatenate([self.arrays["train", "identity"], self.arrays["validation", "identity"]])
        labels = np.concatenate([self.labels["train"], self.labels["validation"]])
        return [Features({**{("train", v): pooled[v][fit] for v in views},
                          ("validation", "identity"): pooled["identity"][held_out]},
                         {"train": labels[fit], "validation": labels[held_out]}, self.widths)
                for fit, held_out in fold_indices(labels, k, seed)]


def fold_indices(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k stratified folds, seeded: (indices to fit on, held-out indices) per fold; each index is held out once."""
    counts = np.bincount(labels)
    if counts[counts > 0].min() < k:
        raise ValueError(f"trainer.cv_folds={k} needs at least {k} images of every class in train + validation; "
                         f"the smallest class has {counts[counts > 0].min()}")
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def files_digest(root: str) -> str:
    """SHA-256 over a SavedModel folder's files, names and contents."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def load(network: Network, splits: Splits, views: Mapping[str, Sequence[str]], batch_size: int,
         cache_dir: Path, seed: int = 0) -> Features:
    """The features of each split's images in its `views` (and the identity), from the cache or extracted into
    it. One pass of the images feeds every backbone whose features are missing. `seed` draws the random views."""
    digests = {backbone.name: files_digest(backbone.module_path) for backbone in network.backbones}
    arrays, labels = {}, {}
    for split, split_views in views.items():
        for name in ("identity", *sorted(set(split_views) - {"identity"})):
            fields = {b.name: _fields(network, b, digests, splits, split, view_fingerprint(name, seed))
                      for b in network.backbones}
            paths = {b.name: cache_dir / "features" / f"{cache_key(fields[b.name])}.npz" for b in network.backbones}
            missing = [b for b in network.backbones if not paths[b.name].is_file()]
            if missing:
                _extract(Network(missing, network.input_size), _images(splits, split, name, seed), f"{split}/{name}",
                         batch_size, [paths[b.name] for b in missing])
            parts = []
            for backbone in network.backbones:
                with np.load(paths[backbone.name]) as cached:
                    parts.append(cached["features"])
                    labels[split] = cached["labels"]
            arrays[split, name] = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    widths = tuple(int(array.shape[1]) for array in parts)
    return Features(arrays, labels, widths)


def _fields(network: Network, backbone, digests: dict, splits: Splits, split: str, view: str | None) -> dict:
    return {"backbone": backbone.module_path, "backbone_files": digests[backbone.name],
            "input_size": list(network.size_of(backbone)), "decoded_size": list(network.size_of(backbone)),
            "preprocessing": network.fingerprint(backbone), "dataset": splits.name, "version": splits.version,
            "split": splits.specs[split], "view": view, "tensorflow": tf.__version__}


def _images(splits: Splits, split: str, name: str, seed: int) -> tuple[tf.data.Dataset, str]:
    """The split's (image, label) pairs in the view's image part (encoded, or decoded by an image view), and its
    fixed part (applied to the resized batches)."""
    image, fixed = split_view(name)
    images = splits.get(split)
    return (viewed_images(images, image, seed) if image else images), fixed


def _extract(network: Network, images: tuple[tf.data.Dataset, str], description: str, batch_size: int,
             paths: list[Path]) -> None:
    """Every backbone's features of the images, from one decode per size, into `paths` (in the network's order)."""
    names = "+".join(b.name for b in network.backbones)
    log.info("extracting features of %s for %s", description, names)
    images, fixed = images
    batches = make_batches(images, network.image_sizes, batch_size).map(lambda x, y: (fixed_views(x, fixed), y))
    with progress.bar(int(images.cardinality()), f"features {description} {names}", "img") as bar:
        outputs, labels = predict_batches(network.extractor(), batches, progress=bar.update)
    for backbone, path in zip(network.backbones, paths):
        features = outputs[backbone.name]
        with files.replaced(path) as partial:  # readers never see half a file, even with parallel workers
            with open(partial, "wb") as f:
                np.savez(f, features=features, labels=labels)
