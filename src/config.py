"""Config helpers: the project root resolver, user-facing errors and value checks."""

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
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for choice in choices:
            if choice not in options:
                raise UserError(f"unknown {group} '{choice}'; choose one of: {', '.join(options)}")


def backbone_configs(cfg: DictConfig) -> list[DictConfig]:
    """The backbones of the model: those of `backbones`, else `backbone`. An entry of `backbones` names a
    conf/backbone option, or is a mapping with a backbone's name, handle and input_size (e.g. a module of
    your own)."""
    if not cfg.get("backbones"):
        return [cfg.backbone]
    options = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
    entries = []
    for entry in cfg.backbones:
        if isinstance(entry, str):
            if entry not in options:
                raise UserError(f"unknown backbone {entry!r} in backbones; choose from: {', '.join(options)}")
            entry = OmegaConf.load(CONF_DIR / "backbone" / f"{entry}.yaml")
        elif not isinstance(entry, DictConfig) or not {"name", "handle", "input_size"} <= set(entry):
            raise UserError(f"backbones entry {entry} is invalid: give a conf/backbone name, or a mapping "
                            "with name, handle and input_size")
        entries.append(OmegaConf.merge({"trainable": False, "train_batchnorm": False}, entry))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise UserError(f"backbones={names} names a backbone twice; list each once")
    # interpolations such as ${paths.backbones_dir} resolve against cfg's paths
    return list(OmegaConf.merge({"paths": cfg.paths}, {"backbones": entries}).backbones)


def backbone_label(cfg: DictConfig) -> str:
    """`mobilenet_v2_100_224`, or `mobilenet_v1_100_224+efficientnet_lite0_224` for several."""
    return "+".join(b.name for b in backbone_configs(cfg))


def model_input_size(cfg: DictConfig) -> tuple[int, int]:
    """The size images are decoded to: the largest backbone input, each backbone resizing to its own."""
    sizes = [tuple(b.input_size) for b in backbone_configs(cfg)]
    return max(s[0] for s in sizes), max(s[1] for s in sizes)


def _check(cfg: DictConfig, key: str, ok, expected: str, kind: type = numbers.Real) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise UserError(f"{key}={value!r} is invalid: expected {expected}")


def validate(cfg: DictConfig) -> None:
    """Check the values a user is likely to override, before any work starts."""
    _check(cfg, "lr", lambda v: v > 0, "a positive number, e.g. lr=1e-3")
    _check(cfg, "batch_size", lambda v: v >= 1, "a positive integer, e.g. batch_size=32", int)
    _check(cfg, "epochs", lambda v: v >= 1, "a positive integer, e.g. epochs=30", int)
    _check(cfg, "seed", lambda v: v >= 0, "a non-negative integer, e.g. seed=42", int)
    _check(cfg, "model.dropout", lambda v: 0 <= v < 1, "a number in [0, 1), e.g. model.dropout=0.2")
    _check(cfg, "model.label_smoothing", lambda v: 0 <= v < 1,
           "a number in [0, 1), e.g. model.label_smoothing=0.1")
    _check(cfg, "trainer.early_stopping.patience", lambda v: v >= 0,
           "a non-negative integer, e.g. trainer.early_stopping.patience=5", int)
    _check(cfg, "export.top_k", lambda v: v >= 1, "a positive integer, e.g. export.top_k=5", int)
    _check(cfg, "finetune.lr_scale", lambda v: v > 0, "a positive number, e.g. finetune.lr_scale=0.1")
    _check(cfg, "finetune.epochs", lambda v: v >= 1, "a positive integer, e.g. finetune.epochs=10", int)
    _check(cfg, "finetune.patience", lambda v: v >= 0, "a non-negative integer, e.g. finetune.patience=3", int)
    for key in ("trainer.mixed_precision", "trainer.profile", "trainer.refit", "finetune.enabled"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise UserError(f"{key}={OmegaConf.select(cfg, key)!r} is invalid: expected true or false")
    for backbone in backbone_configs(cfg):
        size = backbone.input_size
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 for s in size):
            key = f"input_size of backbones entry {backbone.name}" if cfg.get("backbones") else "backbone.input_size"
            raise UserError(f"{key}={list(size)} is invalid: expected [height, width], e.g. [224,224]")


def validate_serve(cfg: DictConfig) -> None:
    _check(cfg, "serve.port", lambda v: 0 < v < 65536, "a TCP port, e.g. serve.port=8080", int)
    _check(cfg, "serve.max_images", lambda v: v >= 1, "a positive integer, e.g. serve.max_images=32", int)
    _check(cfg, "serve.max_pixels", lambda v: v >= 1, "a positive integer, e.g. serve.max_pixels=50_000_000", int)
    _check(cfg, "serve.max_request_pixels", lambda v: v >= 1,
           "a positive integer, e.g. serve.max_request_pixels=100_000_000", int)
    _check(cfg, "serve.max_body_mb", lambda v: v > 0, "a positive number, e.g. serve.max_body_mb=16")


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
