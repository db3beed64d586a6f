"""What every script does the same way: read the project's config, point MLflow at its store, and keep the
error contract (bad input is one line on stderr, `error: <what to do>`, and exit status 1)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from src.config import UserError, load_config
from src.track import check_server


def command(main):
    """Wrap a script's `main(argv) -> int | None`: a UserError becomes `error: <message>` and exit status 1."""
    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return wrapped


def config(*overrides: str) -> DictConfig:
    """The project's config, as `python train.py <overrides>` composes it, with MLflow pointed at its store."""
    cfg = load_config(*overrides)
    check_server(cfg.tracking.uri)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return cfg


def model_parser(description: str, cfg: DictConfig) -> argparse.ArgumentParser:
    """The arguments of the scripts that score a logged model and log an evaluation run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-uri", default=f"models:/{cfg.registry.model_name}@champion")
    parser.add_argument("--experiment", default=cfg.tracking.experiment_name, help="MLflow experiment of the run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def benchmark_env(work: Path) -> dict[str, str]:
    """The environment for a benchmark's `python train.py` subprocesses: its own MLflow store and feature cache
    under `work`, and TensorFlow's C++ logging quiet."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
            "FLOWERS_CACHE_DIR": str(work / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}


def benchmark_folder(prefix: str) -> Path:
    """A fresh throw-away folder for a benchmark on the offline data, printed; one line and exit without the data."""
    if not os.environ.get("TFDS_DATA_DIR"):
        sys.exit("error: set TFDS_DATA_DIR to the prepared oxford_flowers102, e.g. ../shared/tensorflow_datasets")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"working in {work}", flush=True)
    return work
