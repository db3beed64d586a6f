"""Config: the project root, composing the config for scripts and tests, user-facing errors, serving checks.

A training job's config is checked and resolved once, by src/spec.py."""

from __future__ import annotations

import numbers
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


class UserError(Exception):
    """Bad input the user can fix. Its message is one line that says how."""


def load_config(*overrides: str) -> DictConfig:
    """The training config, composed as `python train.py <overrides>` would; for scripts and tests."""
    check_group_choices(list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name="train", overrides=list(overrides))
        except (OverrideParseException, ConfigCompositionException) as error:
            raise UserError(" ".join(str(error).split())) from None


def check_group_choices(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=name` overrides that name no config file, in one line rather than Hydra's page."""
    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group
        if not (conf_dir / group).is_dir():
            continue
        if override.is_sweep_override():
            choices = list(override.sweep_string_iterator())
        else:
            choices = [override.get_value_element_as_str()]
        options = sorted(p.relative_to(conf_dir / group).with_suffix("").as_posix()
                         for p in (conf_dir / group).rglob("*.yaml"))
        for choice in choices:
            if choice not in options:
                raise UserError(f"unknown {group} '{choice}'; choose one of: {', '.join(options)}")


def check(cfg: DictConfig, key: str, ok, expected: str, kind: type = numbers.Real) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise UserError(f"{key}={value!r} is invalid: expected {expected}")


# What the project's MLflow experiments hold (src/track.py tags them), for MLflow's UI and API. MLflow 3.17's UI does
# not yet read it for the landing view (mlflow/mlflow#24498), so make ui prints links to the runs (scripts/ui_links.py).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# serve.runtime (src/runtimes.py's SERVED)
RUNTIMES = ("savedmodel", "openvino", "tflite", "tflite_int8_dynamic", "tflite_float16")


def validate_serve(cfg: DictConfig) -> None:
    check(cfg, "serve.port", lambda v: 0 < v < 65536, "a TCP port, e.g. serve.port=8080", int)
    check(cfg, "serve.max_images", lambda v: v >= 1, "a positive integer, e.g. serve.max_images=32", int)
    check(cfg, "serve.max_pixels", lambda v: v >= 1, "a positive integer, e.g. serve.max_pixels=50_000_000", int)
    check(cfg, "serve.max_request_pixels", lambda v: v >= 1,
           "a positive integer, e.g. serve.max_request_pixels=100_000_000", int)
    check(cfg, "serve.max_body_mb", lambda v: v > 0, "a positive number, e.g. serve.max_body_mb=16")
    check(cfg, "serve.runtime", lambda v: v in RUNTIMES, ", ".join(RUNTIMES), str)
    check(cfg, "serve.workers", lambda v: v >= 1, "a positive integer, e.g. serve.workers=2", int)
    if cfg.serve.get("threads") is not None:
        check(cfg, "serve.threads", lambda v: v >= 1, "a positive integer or null, e.g. serve.threads=1", int)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Every resolved config value as `a.b.c -> value`, the way MLflow params want them."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
