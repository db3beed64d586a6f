"""The job spec: a training job's composed config, checked once and resolved into typed, immutable values.

`Job.from_config(cfg)` is the one place that reads a training job's config. It checks every value a user is
likely to override (bad input is a one-line `UserError`), resolves the backbones (a conf/backbone name is read
once, here) and the views, and freezes the result. Everything downstream takes these values, not the DictConfig.
"""

from __future__ import annotations

import inspect
import json
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from omegaconf import DictConfig, OmegaConf

from src.augment import POLICIES
from src.config import CONF_DIR, UserError, check
from src.views import parse_views

HEADS = ("dense", "logistic_regression")
SELECT_ON = ("clean", "shifted", "mean", "served")
REFIT_BUDGETS = ("epochs", "steps")
STRATEGIES = ("default", "mirrored", "multi_worker")


@dataclass(frozen=True)
class Backbone:
    name: str
    handle: str
    input_size: tuple[int, int]
    trainable: bool = False
    train_batchnorm: bool = False  # with trainable: batch norm in training mode too (batch statistics)


@dataclass(frozen=True)
class Augmentation:
    """Random layers between the resize and the backbone, active in training only: the classic flip, rotation,
    zoom and contrast, or `random_views`, src/augment.py's policy (the one the cache's random views draw from)."""
    enabled: bool
    horizontal_flip: bool
    rotation: float  # fraction of a full turn
    zoom: float
    contrast: float
    random_views: bool = False
    view_policy: str = "standard"  # src/augment.py's policy that random_views and random training views draw from


@dataclass(frozen=True)
class Head:
    kind: str  # dense: a Keras head trained with the optimizer; logistic_regression: scikit-learn, on cached features
    dropout: float
    normalize_features: bool  # unit-normalise each backbone's features before the head
    label_smoothing: float
    c_grid: tuple[float, ...] = ()  # logistic regression: the inverse regularisation strengths tried on validation
    max_iter: int = 1000
    tol: float = 1e-6  # lbfgs stops when the gradient is this small; scikit-learn's 1e-4 stops large C early


@dataclass(frozen=True)
class Optimizer:
    """A Keras optimizer class, and its keyword arguments besides the learning rate."""
    cls: type
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def resolve(cls, name: str, options: dict) -> Optimizer:
        """`name` as Keras spells it in configs (adam, sgd, AdamW...); the options must be the class's arguments."""
        classes = {c.__name__.lower(): c for c in vars(keras.optimizers).values()
                   if isinstance(c, type) and issubclass(c, keras.optimizers.Optimizer)}
        found = classes.get(str(name).lower())
        if found is None:
            raise UserError(f"trainer.optimizer={name!r} with {options} is not a Keras optimizer: no such class; "
                            f"choose one of: {', '.join(sorted(classes))}")
        # the class's own arguments and those its bases take through **kwargs
        known = {p for c in found.__mro__ if isinstance(c, type) and issubclass(c, keras.optimizers.Optimizer)
                 for p in inspect.signature(c.__init__).parameters} - {"self", "args", "kwargs", "learning_rate"}
        if set(options) - known:
            raise UserError(f"trainer.optimizer={name!r} with {options} is not a Keras optimizer: {found.__name__} "
                            f"takes no {', '.join(sorted(set(options) - known))}; it takes {', '.join(sorted(known))}")
        return cls(found, tuple(sorted(options.items())))

    def make(self, lr: float) -> keras.optimizers.Optimizer:
        return self.cls(learning_rate=lr, **dict(self.options))


@dataclass(frozen=True)
class Finetune:
    """Stage 2: the backbones unfrozen at lr * lr_scale, with augmentation, early stopping on validation."""
    lr_scale: float
    epochs: int
    patience: int


@dataclass(frozen=True)
class Export:
    top_k: int
    model_name: str
    version: int
    sample_predictions: int


@dataclass(frozen=True)
class Job:
    run_name: str
    data: DictConfig  # read-only; each data source has keys of its own (src/data.py reads them)
    backbones: tuple[Backbone, ...]
    head: Head
    augmentation: Augmentation
    tta: tuple[str, ...]  # the views averaged at test time and in the served model
    train_views: tuple[str, ...]  # the views of each training image, each an example
    optimizer: Optimizer
    lr: float
    batch_size: int
    epochs: int
    seed: int
    patience: int  # early stopping on val accuracy
    finetune: Finetune | None
    refit: str | None  # None, or the budget a refit on train + validation replays: "epochs" or "steps"
    cv_folds: int | None  # k-fold cross-validation on train + validation selects, instead of validation alone
    select_on: str  # clean, shifted, mean or served: validation as it is, under the shifts of src/shifts.py, their
    # mean, or through the model's test-time views (model.tta), as the model is served
    shift_per_class: int  # the shifted validation and test sets: this many images of each class
    measure_shifts: bool  # measure the selected model on the shifted validation sample, the final one on shifted test
    feature_cache: bool
    strategy: str
    tf_config: str | None  # strategy=multi_worker: the cluster and this process's task, as TF_CONFIG's JSON
    cpu_devices: int | None
    mixed_precision: bool
    profile: bool
    verbose: int
    export: Export
    cache_dir: Path
    config: DictConfig  # the whole composed config, read-only: the run's params and config.yaml

    @property
    def input_size(self) -> tuple[int, int]:
        """Images are decoded to the largest backbone input; each backbone resizes to its own."""
        return max(b.input_size[0] for b in self.backbones), max(b.input_size[1] for b in self.backbones)

    @property
    def backbone_label(self) -> str:
        return "+".join(b.name for b in self.backbones)

    @property
    def selects_on_shifts(self) -> bool:
        """Whether selection reads the shifted validation sample (trainer.select_on shifted or mean)."""
        return self.select_on in ("shifted", "mean")

    @property
    def uses_feature_cache(self) -> bool:
        """Cached features stand in for the images when nothing between image and features trains or varies.
        With fine-tuning on, they serve its first stage."""
        frozen = not any(b.trainable for b in self.backbones)
        return self.feature_cache and frozen and not self.augmentation.enabled

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Job:
        model, trainer = cfg.model, cfg.trainer
        _check_values(cfg)
        policy = model.get("view_policy", "standard")
        head = Head(model.get("head", "dense"), model.dropout, model.normalize_features, model.label_smoothing,
                    tuple(model.get("c_grid") or ()), model.get("max_iter", 1000), model.get("tol", 1e-6))
        options = OmegaConf.to_container(trainer.optimizer)
        optimizer = Optimizer.resolve(options.pop("name"), options)
        job = cls(
            run_name=run_name(cfg), data=_read_only(cfg.data), backbones=resolve_backbones(cfg), head=head,
            augmentation=Augmentation(**{k: model.augmentation[k] for k in
                                         ("enabled", "horizontal_flip", "rotation", "zoom", "contrast")},
                                      random_views=model.augmentation.get("random_views", False),
                                      view_policy=policy),
            tta=parse_views(model.tta, "model.tta"),
            train_views=parse_views(model.train_views, "model.train_views", random=True, policy=policy),
            optimizer=optimizer, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed,
            patience=trainer.early_stopping.patience,
            finetune=Finetune(cfg.finetune.lr_scale, cfg.finetune.epochs, cfg.finetune.patience)
            if cfg.finetune.enabled else None,
            refit=trainer.get("refit_budget", "epochs") if trainer.refit else None,
            cv_folds=trainer.get("cv_folds"), select_on=trainer.get("select_on", "clean"),
            shift_per_class=cfg.robustness.per_class, measure_shifts=cfg.robustness.measure,
            feature_cache=trainer.feature_cache, strategy=trainer.strategy, tf_config=tf_config(trainer),
            cpu_devices=trainer.cpu_devices, mixed_precision=trainer.mixed_precision, profile=trainer.profile,
            verbose=trainer.verbose, export=Export(**cfg.export), cache_dir=Path(cfg.paths.cache_dir),
            config=_read_only(cfg))
        _check_combinations(job)
        return job


def _read_only(node: DictConfig) -> DictConfig:
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    OmegaConf.set_readonly(node, True)
    return node


def backbone_entries(cfg: DictConfig) -> list:
    """The raw entries: those of `backbones` (names or mappings), else the one `backbone`."""
    return list(cfg.backbones) if cfg.get("backbones") else [cfg.backbone]


def run_name(cfg: DictConfig) -> str:
    """e.g. `mobilenet_v2_100_224-lr0.03-bs64-seed1`, `...-finetune-tta_flip-views_flip-refit-...` with techniques.
    Reads no file and raises nothing: a sweep job that fails on a bad config still gets its named run."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    names = [e if isinstance(e, str) else e.get("name", "invalid") if isinstance(e, DictConfig) else "invalid"
             for e in backbone_entries(cfg)]
    model, trainer = cfg.model, cfg.trainer
    techniques = [name for name, on in (
        (str(model.get("head")), model.get("head", "dense") != "dense"),
        ("finetune", cfg.finetune.enabled),
        (f"tta_{model.tta}", model.tta != "none"),
        (f"views_{str(model.train_views).replace(':', '')}", model.train_views != "none"),
        (f"policy_{model.get('view_policy')}", model.get("view_policy", "standard") != "standard"),
        (f"select_{trainer.get('select_on')}", trainer.get("select_on", "clean") != "clean"),
        (f"cv{trainer.get('cv_folds')}", trainer.get("cv_folds") is not None),
        ("refit" + ("_steps" if trainer.get("refit_budget", "epochs") == "steps" else ""), trainer.refit)) if on]
    lr = [] if model.get("head", "dense") == "logistic_regression" else [f"lr{cfg.lr:g}", f"bs{cfg.batch_size}"]
    return "-".join(["+".join(names), *techniques, *lr, f"seed{cfg.seed}"])


def resolve_backbones(cfg: DictConfig) -> tuple[Backbone, ...]:
    """An entry of `backbones` names a conf/backbone option, or is a mapping with a backbone's name, handle and
    input_size (e.g. a module of your own)."""
    options = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
    entries = []
    for entry in backbone_entries(cfg):
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
    resolved = OmegaConf.merge({"paths": cfg.paths}, {"backbones": entries}).backbones
    backbones = []
    for entry in resolved:
        size = entry.input_size
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 for s in size):
            key = f"input_size of backbones entry {entry.name}" if cfg.get("backbones") else "backbone.input_size"
            raise UserError(f"{key}={list(size)} is invalid: expected [height, width], e.g. [224,224]")
        _check_bool(entry, "trainable", f"{entry.name}.trainable")
        backbones.append(Backbone(entry.name, entry.handle, tuple(size), entry.trainable, entry.train_batchnorm))
    return tuple(backbones)


def tf_config(trainer: DictConfig) -> str | None:
    """strategy=multi_worker's cluster as the TF_CONFIG JSON that MultiWorkerMirroredStrategy reads: from
    trainer.cluster, {workers: [host:port, ...], index: i}, with this process worker i and worker 0 the chief;
    else the TF_CONFIG environment variable as it is, for launchers that set it (with a `chief` task or not)."""
    if trainer.strategy != "multi_worker":
        return None
    cluster = trainer.get("cluster")
    if cluster is not None:
        shown = f"trainer.cluster={OmegaConf.to_container(cluster) if isinstance(cluster, DictConfig) else cluster!r}"
        config = ({"cluster": {"worker": OmegaConf.to_container(cluster.get("workers"))},
                   "task": {"type": "worker", "index": cluster.get("index")}}
                  if isinstance(cluster, DictConfig) and OmegaConf.is_list(cluster.get("workers")) else None)
    elif os.environ.get("TF_CONFIG"):
        shown = f"TF_CONFIG={os.environ['TF_CONFIG']}"
        try:
            config = json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            config = None
    else:
        raise UserError("trainer.strategy=multi_worker needs the cluster: set trainer.cluster={workers:[host:port,"
                        "host:port],index:i} (i: this process's place in workers, 0 the chief) or TF_CONFIG")
    if not _valid_cluster(config):
        raise UserError(f"{shown} is invalid: expected trainer.cluster={{workers:[host:port,host:port],index:i}} "
                        "with 0 <= i < the number of workers, or TF_CONFIG with a cluster of worker (and chief) "
                        "host:port lists and this process's task type and index")
    return json.dumps(config)


def _valid_cluster(config) -> bool:
    try:
        tasks, task = config["cluster"], config["task"]
        addresses = [a for kind in ("chief", "worker") for a in tasks.get(kind, [])]
        return (bool(addresses) and set(tasks) <= {"chief", "worker"}
                and all(isinstance(a, str) and re.fullmatch(r"[^\s:]+:\d+", a) for a in addresses)
                and type(task["index"]) is int and 0 <= task["index"] < len(tasks[task["type"]]))
    except (KeyError, TypeError, AttributeError):
        return False


def _check_bool(cfg: DictConfig, key: str, shown: str | None = None) -> None:
    if not isinstance(OmegaConf.select(cfg, key), bool):
        raise UserError(f"{shown or key}={OmegaConf.select(cfg, key)!r} is invalid: expected true or false")


def _check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...], default: str | None = None) -> None:
    value = OmegaConf.select(cfg, key, default=default)
    if value not in choices:
        raise UserError(f"{key}={value!r} is unknown; use one of: {', '.join(choices)}")


def _check_values(cfg: DictConfig) -> None:
    """The values a user is likely to override, each on its own."""
    check(cfg, "lr", lambda v: v > 0, "a positive number, e.g. lr=1e-3")
    check(cfg, "batch_size", lambda v: v >= 1, "a positive integer, e.g. batch_size=32", int)
    check(cfg, "epochs", lambda v: v >= 1, "a positive integer, e.g. epochs=30", int)
    check(cfg, "seed", lambda v: v >= 0, "a non-negative integer, e.g. seed=42", int)
    check(cfg, "model.dropout", lambda v: 0 <= v < 1, "a number in [0, 1), e.g. model.dropout=0.2")
    check(cfg, "model.label_smoothing", lambda v: 0 <= v < 1,
           "a number in [0, 1), e.g. model.label_smoothing=0.1")
    check(cfg, "trainer.early_stopping.patience", lambda v: v >= 0,
           "a non-negative integer, e.g. trainer.early_stopping.patience=5", int)
    check(cfg, "export.top_k", lambda v: v >= 1, "a positive integer, e.g. export.top_k=5", int)
    check(cfg, "finetune.lr_scale", lambda v: v > 0, "a positive number, e.g. finetune.lr_scale=0.1")
    check(cfg, "finetune.epochs", lambda v: v >= 1, "a positive integer, e.g. finetune.epochs=10", int)
    check(cfg, "finetune.patience", lambda v: v >= 0, "a non-negative integer, e.g. finetune.patience=3", int)
    for key in ("trainer.mixed_precision", "trainer.profile", "trainer.refit", "trainer.feature_cache",
                "finetune.enabled", "model.normalize_features", "model.augmentation.enabled",
                "model.augmentation.random_views"):
        _check_bool(cfg, key)
    _check_choice(cfg, "model.head", HEADS, "dense")
    _check_choice(cfg, "model.view_policy", tuple(POLICIES), "standard")
    _check_choice(cfg, "trainer.refit_budget", REFIT_BUDGETS, "epochs")
    _check_choice(cfg, "trainer.strategy", STRATEGIES)
    _check_choice(cfg, "trainer.select_on", SELECT_ON, "clean")
    check(cfg, "robustness.per_class", lambda v: v >= 1, "a positive integer, e.g. robustness.per_class=10", int)
    _check_bool(cfg, "robustness.measure")
    if cfg.trainer.get("cv_folds") is not None:
        check(cfg, "trainer.cv_folds", lambda v: v >= 2, "null or an integer of at least 2, e.g. trainer.cv_folds=5",
               int)
    if cfg.model.get("head") == "logistic_regression":
        grid = cfg.model.get("c_grid")
        if not grid or not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and c > 0 for c in grid):
            raise UserError(f"model.c_grid={OmegaConf.to_container(grid) if grid else grid!r} is invalid: expected a "
                            "list of positive numbers, e.g. model.c_grid=[1,10,100]")
    cpu_devices = cfg.trainer.cpu_devices
    if cpu_devices is not None and (isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int)
                                    or cpu_devices < 1):
        raise UserError(f"trainer.cpu_devices={cpu_devices!r} is invalid: expected null or a positive integer, e.g. 2")


def _check_combinations(job: Job) -> None:
    """Options that each hold alone but not together."""
    if job.cv_folds and not job.uses_feature_cache:
        raise UserError("trainer.cv_folds needs the cached-feature path: a frozen backbone, "
                        "model.augmentation.enabled=false and trainer.feature_cache=true")
    if job.cv_folds and job.finetune:
        raise UserError("trainer.cv_folds does not cross-validate fine-tuning; set finetune.enabled=false, "
                        "or trainer.cv_folds=null")
    if job.select_on != "clean" and (not job.uses_feature_cache or job.finetune or job.cv_folds):
        images = "test-time views" if job.select_on == "served" else "shifted validation images"
        raise UserError(f"trainer.select_on={job.select_on} selects on cached features of the {images}: keep the "
                        "backbones frozen, augmentation off, finetune.enabled=false and trainer.cv_folds=null, or use "
                        "trainer.select_on=clean")
    if job.head.kind == "logistic_regression":
        if not job.uses_feature_cache:
            raise UserError("model=logistic_regression trains on cached features: keep the backbone frozen, "
                            "model.augmentation.enabled=false and trainer.feature_cache=true")
        if job.finetune:
            raise UserError("model=logistic_regression has no fine-tuning stage; set finetune.enabled=false")
        if job.mixed_precision or job.strategy != "default":
            raise UserError("model=logistic_regression trains with scikit-learn on the CPU; set "
                            "trainer.strategy=default and trainer.mixed_precision=false")
    if job.strategy == "multi_worker" and job.uses_feature_cache:
        raise UserError("trainer.strategy=multi_worker trains end to end, through the images (each worker would "
                        "compute the feature cache): set trainer.feature_cache=false")
