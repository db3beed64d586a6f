"""Feature cache: a frozen backbone's features of each split, computed once and kept on disk.

With the backbone frozen and augmentation off, every epoch of every trial would push the same images through
the same backbone. Here they go through once; heads then train on the cached features in seconds. The key
covers everything that changes the features, so a changed backbone file, input size, dataset version, split
or preprocessing gets new features rather than stale ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from src.config import backbone_configs
from src.model import predict_batches

log = logging.getLogger(__name__)

# Bump when decode_and_resize or the model's resize/scale layers change.
PREPROCESSING = "decode_and_resize(alpha-on-white-uint8,bilinear,antialias)->Resizing(bilinear,antialias)->Rescaling(1/255)"


def applies(cfg) -> bool:
    """Cached features stand in for the images only when nothing between image and features trains or varies.
    With fine-tuning on, they serve its first stage (the head on the frozen backbones)."""
    frozen = not any(backbone.trainable for backbone in backbone_configs(cfg))
    return bool(cfg.trainer.feature_cache) and frozen and not cfg.model.augmentation.enabled


def files_digest(root: str) -> str:
    """SHA-256 over a SavedModel folder's files, names and contents."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(backbone_path: str, backbone_files: str, input_size, dataset: str, version: str, split: str,
              decoded_size=None, view: str = "identity") -> str:
    """`backbone_files` is `files_digest(backbone_path)`, computed once per job. `decoded_size`: the size images
    are decoded to before the backbone's own resize, when it differs (several backbones); `view`: the
    test-time-augmentation view of the image (src.model.view)."""
    fields = {"backbone": backbone_path, "backbone_files": backbone_files, "input_size": list(input_size),
              "dataset": dataset, "version": version, "split": split, "preprocessing": PREPROCESSING,
              "tensorflow": tf.__version__}
    if decoded_size is not None and tuple(decoded_size) != tuple(input_size):
        fields["decoded_size"] = list(decoded_size)
    if view != "identity":
        fields["view"] = view
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def load_or_extract(extractor: keras.Model, batches: tf.data.Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) from `path` if it exists, else computed from `batches` and written atomically."""
    if path.is_file():
        with np.load(path) as cached:
            return cached["features"], cached["labels"]
    log.info("extracting features into %s", path)
    features, labels = predict_batches(extractor, batches)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, features=features, labels=labels)
    os.replace(partial, path)  # readers never see half a file, even with parallel workers
    return features, labels
