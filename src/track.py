"""Tracking: the MLflow store and experiment, a job's run, its tags, and per-epoch metrics."""

from __future__ import annotations

import fcntl
import logging
import platform
import subprocess
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import keras
import mlflow
import optuna
import requests
import tensorflow as tf
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from src.config import EXPERIMENT_KIND, PROJECT_ROOT, UserError, flatten
from src.data import Splits
from src.spec import Job

log = logging.getLogger(__name__)

# A sweep's parent run id, handed to its jobs (which may run in other processes) through the environment.
SWEEP_RUN_ENV = "FLOWERS_SWEEP_RUN_ID"

# Keras history keys -> the metric names shared by tracking, sweeps, registry and reports.
EPOCH_METRICS = {"loss": "train/loss", "accuracy": "train/accuracy", "val_loss": "val/loss",
                 "val_accuracy": "val/accuracy", "val_shifted_accuracy": "val/shifted_accuracy",
                 "val_served_accuracy": "val/served_accuracy", "val_selection": "val/selection"}


def retry_on_race(create, attempts: int = 3):
    """Workers that start together on a fresh store race to create its tables, study or experiment; the
    losers see an error from the database. Trying again finds what the winner created."""
    for attempt in range(attempts):
        try:
            return create()
        except (MlflowException, SQLAlchemyError):
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


@contextmanager
def store_lock(uri: str):
    """Hold a lock that every process opening this database store takes. MLflow and Optuna's RDBStorage
    create and migrate a fresh database's tables when a process first opens it. Two processes doing that at
    once corrupt an SQLite file for good ("table _alembic_tmp_tags already exists") and fail on PostgreSQL
    ("duplicate key value violates unique constraint", e.g. on Optuna's studydirection type). A file lock
    serialises SQLite, an advisory lock PostgreSQL."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock = open(path.with_name(path.name + ".lock"), "w")
        except OSError:  # a folder only readable here: nothing will create tables in it
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    elif urlparse(uri).scheme.startswith("postgresql"):
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:  # the lock is released when this session ends
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                               {"key": zlib.crc32(b"store-init")})
            yield
        engine.dispose()
    else:
        yield


def check_server(uri: str) -> None:
    """A tracking server that does not answer is one line at once, not MLflow's minutes of retries."""
    if urlparse(uri).scheme in ("http", "https"):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as error:
            raise UserError(f"no MLflow tracking server answers at {uri} ({type(error).__name__}); "
                            "start it (make tracking-server) or fix MLFLOW_TRACKING_URI") from None


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    check_server(cfg.uri)
    mlflow.set_tracking_uri(cfg.uri)
    with store_lock(cfg.uri):
        mlflow.MlflowClient().search_experiments(max_results=1)  # opens (and if new, creates) the store once
    return retry_on_race(lambda: _experiment_id(cfg))


def _experiment_id(cfg: DictConfig) -> str:
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        local = urlparse(cfg.uri).scheme not in ("http", "https", "databricks")
        experiment_id = mlflow.create_experiment(cfg.experiment_name, tags=EXPERIMENT_KIND,
                                                 artifact_location=cfg.artifact_location if local else None)
    else:
        experiment_id = experiment.experiment_id
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:
                mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
    return mlflow.set_experiment(experiment_id=experiment_id).experiment_id


@contextmanager
def job_run(name: str, cfg: DictConfig, parent_run_id: str | None):
    """The job's MLflow run, with every config value as a param and the config as config.yaml. A run that raises
    says why it ended: FAILED, or KILLED when stopped on purpose (Ctrl-C, an Optuna prune)."""
    with mlflow.start_run(run_name=name, parent_run_id=parent_run_id) as run:
        log.info("MLflow run %s (%s) in %s", name, run.info.run_id, mlflow.get_tracking_uri())
        try:
            mlflow.log_params(flatten(cfg))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            yield run
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.end_run("KILLED" if isinstance(error, (KeyboardInterrupt, optuna.TrialPruned)) else "FAILED")
            raise


def run_config(run_id: str) -> DictConfig:
    """The resolved config a training run logged as config.yaml."""
    try:
        return OmegaConf.create(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    except MlflowException:
        raise UserError(f"run {run_id} has no config.yaml; use a run trained by this project") from None


def git_commit() -> str:
    """The checked-out commit, with "-dirty" when tracked files have uncommitted changes."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)

    head = git("rev-parse", "--verify", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_tags(strategy: tf.distribute.Strategy) -> dict[str, str]:
    """The devices the job trains on: their kind and model, and how many the strategy uses (under multi_worker,
    every worker's, e.g. worker:0/CPU:0, worker:1/CPU:0)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        kind, model = "GPU", ", ".join(sorted(set(names)))
    else:
        kind, model = "CPU", _cpu_model()
    try:
        devices = [d.rsplit("/", 1)[-1].removeprefix("device:") for d in strategy.extended.worker_devices]
    except RuntimeError:  # the default strategy has no device list: it runs on TensorFlow's default device
        devices = [f"{kind}:0"]
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):  # each worker has this worker's devices
        tasks = strategy.cluster_resolver.cluster_spec().as_dict()
        devices = [f"{task}:{i}/{d}" for task in ("chief", "worker") for i in range(len(tasks.get(task, ())))
                   for d in devices]
    return {"device": kind, "device.name": model, "device.count": str(len(devices)), "devices": ", ".join(devices)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Where a result comes from: the commit and the versions of the libraries that computed it."""
    return {"git_commit": git_commit(), "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
            "mlflow_version": mlflow.__version__}


def run_tags(job: Job, splits: Splits, strategy: tf.distribute.Strategy) -> dict[str, str]:
    """`precision` is the Keras dtype policy in effect."""
    return {
        **versions(),
        "backbone": job.backbone_label,
        "dataset": splits.name,
        "dataset_version": splits.version,
        "test_split": splits.specs["test"],
        "validation_split": splits.specs["validation"],
        "feature_cache": str(job.uses_feature_cache).lower(),
        "strategy": job.strategy,
        "replicas": str(strategy.num_replicas_in_sync),
        "precision": keras.config.dtype_policy().name,
        **device_tags(strategy),
    }


class EpochMetrics(keras.callbacks.Callback):
    """Logs train/val loss and accuracy to the active MLflow run, with step = epoch (from 1). `prefix`, e.g.
    `refit/`, keeps a second training of the same run apart."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        metrics = {self.prefix + name: float(logs[key]) for key, name in EPOCH_METRICS.items() if key in (logs or {})}
        mlflow.log_metrics(metrics, step=epoch + 1)
