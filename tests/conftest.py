"""Shared fixtures: Hydra composition, a tiny backbone, a throw-away MLflow store, the offline data."""

import os
import uuid
from pathlib import Path

import mlflow
import pytest

from src import register
from src.config import PROJECT_ROOT, load_config
from src.export import log_pyfunc_model
from src.selection import LOSS, SCORE
from tests.helpers import CLASSES, JPEG, export_tiny
from tests.tiny_backbone import save_tiny_backbone

SHARED = PROJECT_ROOT.parent / "shared"
OFFLINE_DATA = SHARED / "tensorflow_datasets"
OFFLINE_BACKBONES = SHARED / "backbones"


compose_config = load_config

# The head and budget the tests on synthetic data were written for (the defaults before the default became the
# linear probe): the un-normalised head, lr 1e-3, batch 32, 20 epochs, patience 5. Tests override what they test.
TEST_HEAD = ["model=default", "lr=1e-3", "batch_size=32", "epochs=20", "trainer.early_stopping.patience=5"]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return save_tiny_backbone(str(tmp_path_factory.mktemp("backbones") / "tiny"))


@pytest.fixture
def tracking_uri(tmp_path):
    """A fresh store, for this process and its subprocesses (MLflow exports it as MLFLOW_TRACKING_URI)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # not the active experiment id of an earlier test's store
    yield uri
    mlflow.set_tracking_uri(None)  # and unsets MLFLOW_TRACKING_URI


@pytest.fixture
def synthetic_cfg(tiny_backbone, tracking_uri, tmp_path):
    """A fast job: synthetic data, the tiny backbone, a throw-away MLflow store."""
    return compose_config(
        *TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224", f"backbone.handle={tiny_backbone}", "backbone.name=tiny",
        "epochs=1", "trainer.verbose=0", f"tracking.artifact_location={tmp_path}/artifacts",
        f"paths.cache_dir={tmp_path}/cache")


@pytest.fixture(scope="module")
def champion_classes() -> tuple[list[str], int]:
    """The champion's class names and top k; a test module that needs another model overrides this fixture."""
    return CLASSES, 3


@pytest.fixture(scope="module")
def champion_store(tiny_backbone, champion_classes, tmp_path_factory):
    """A store with one registered champion (an untrained tiny model, on 4 classes unless `champion_classes` says
    otherwise): (its URI, its SavedModel)."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    classes, top_k = champion_classes
    _, saved = export_tiny(tiny_backbone, classes, tmp / "flowers" / "1", top_k=top_k)
    mlflow.set_experiment("flowers102")
    with mlflow.start_run():
        mlflow.log_metrics({SCORE: 0.5, LOSS: 1.0})
        log_pyfunc_model(saved, [JPEG])
    register.register_best(mlflow.MlflowClient(), "flowers102", "flowers")
    yield uri, saved
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def offline_data_dir() -> str:
    if not (OFFLINE_DATA / "oxford_flowers102").is_dir():
        pytest.skip(f"no offline oxford_flowers102 at {OFFLINE_DATA}")
    return str(OFFLINE_DATA)


@pytest.fixture(scope="session")
def offline_backbones_dir() -> Path:
    if not OFFLINE_BACKBONES.is_dir():
        pytest.skip(f"no offline backbones at {OFFLINE_BACKBONES}")
    return OFFLINE_BACKBONES


@pytest.fixture
def postgres_admin():
    """A connection to the local PostgreSQL server's `postgres` database; skips the test where none answers."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=15)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server answers on 127.0.0.1:5432 ({error})")
    yield admin
    admin.close()


@pytest.fixture
def new_postgres_url(postgres_admin):
    """The URL of a database that does not exist yet; dropped afterwards if the test created it."""
    name = f"flowers_test_{uuid.uuid4().hex[:8]}"
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    postgres_admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_url(postgres_admin, new_postgres_url):
    postgres_admin.execute(f"CREATE DATABASE {new_postgres_url.rsplit('/', 1)[1]}")
    return new_postgres_url


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
