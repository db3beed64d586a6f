"""What every script does the same way: read the project's config, point MLflow at its store, and keep the
error contract (bad input is one line on stderr, `error: <what to do>`, and exit status 1)."""

from __future__ import annotations

import functools
import sys

import mlflow
from omegaconf import DictConfig

from src.config import UserError, load_config


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
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return cfg
