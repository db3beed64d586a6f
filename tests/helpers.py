"""Helpers shared by several test modules: servers on loopback, the command line,
image files, tiny models."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from src.backbone import HubFeatureVector
from src.config import PROJECT_ROOT
from src.model import Network, build_head
from src.serve import wait_until_up
from src.spec import Head


# A champion's classes, and a photo-like image to send it.
CLASSES = ["daisy", "rose", "tulip", "lily"]
PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))


@contextmanager
def running(command: list[str], port: int, env: dict, ready: str = "/ping", timeout: float = 180.0,
            host: str = "127.0.0.1", output: list[str] | None = None):
    """Start a server process, wait until `ready` answers on host:port, yield its URL; stop it afterwards, then
    append what it printed to `output`."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # so that stopping it stops its children too
        url = f"http://{host}:{port}"
        try:
            if not wait_until_up(url + ready, process, timeout):
                log.seek(0)
                raise RuntimeError(f"the server did not come up: {log.read()[-3000:]}")
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
            if output is not None:
                log.seek(0)
                output.append(log.read())


def train_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` with a throw-away MLflow store, cache and output folder under `tmp_path`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "train.py", *overrides, f"tracking.artifact_location={tmp_path}/art",
                           f"hydra.run.dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache"], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def logged_runs(tmp_path: Path) -> list:
    """The runs of the store `train_cli` used under `tmp_path`."""
    if not (tmp_path / "mlflow.db").exists():
        return []
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    """An image (PIL, or a uint8 array) as the bytes of a file of `fmt`."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


JPEG = encode(PHOTO, "JPEG")


def make_image_folder(root: Path, classes=("daisy", "rose"), per_class: int = 3) -> Path:
    """<root>/<split>/<class>/<j>.jpg|png, one flat brightness per class."""
    for split in ("train", "validation", "test"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                pixels = np.full((20 + j, 30, 3), 60 + 120 * i, np.uint8)
                fmt = "PNG" if j % 2 else "JPEG"
                (root / split / name / f"{j}.{fmt.lower()}").write_bytes(encode(pixels, fmt))
    return root


def tiny_classifier(handle: str, num_classes: int, input_size=(32, 32), normalize: bool = False):
    """An untrained classifier on the tiny backbone: uint8 image -> probabilities; and its Network."""
    network = Network([HubFeatureVector(handle, name="tiny")], input_size)
    head = build_head(num_classes, Head("dense", 0.0, normalize, 0.0), network.widths)
    return network.classifier(head), network


def export_tiny(handle: str, class_names: list[str], path: Path, top_k: int = 5, views=("identity",)):
    """An untrained tiny classifier exported as this project exports models: (the Keras model, its SavedModel)."""
    from src.export import export_saved_model

    model, network = tiny_classifier(handle, len(class_names))
    saved = export_saved_model(model, network, class_names, top_k, path, views=views)
    return model, saved
