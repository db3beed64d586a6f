import subprocess
import sys

import keras
import mlflow
import numpy as np
import optuna
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from src import track
from src.config import PROJECT_ROOT, UserError
from src.data import load_splits
from src.serve import free_port
from src.spec import Job, run_name
from tests.conftest import compose_config


def test_setup_creates_the_experiment_with_a_local_artifact_location(tracking_uri, tmp_path):
    cfg = compose_config("tracking.experiment_name=exp-a", f"tracking.artifact_location={tmp_path}/art").tracking
    experiment_id = track.setup(cfg)
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.name == "exp-a" and experiment.artifact_location.endswith(f"{tmp_path}/art")
    # its kind for MLflow's UI and API: model training, not GenAI
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    client = mlflow.MlflowClient()
    older = client.create_experiment("made-before")  # an experiment from before the tag: tagged on first use
    track.setup(compose_config("tracking.experiment_name=made-before").tracking)
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert track.setup(cfg) == experiment_id  # found, not created twice
    assert mlflow.get_tracking_uri() == tracking_uri


# Each process waits until all have imported, then opens the fresh store at once: as a tracking store, or as
# a sweep's workers open an Optuna study.
OPEN_STORE_TOGETHER = """
import os, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from src import search, track
uri, barrier, workers, opener = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < workers:
    time.sleep(0.01)
if opener == "mlflow":
    track.setup(OmegaConf.create({"uri": uri, "experiment_name": "race", "artifact_location": str(barrier.parent)}))
else:
    search.load_study(OmegaConf.create({"study_name": "race", "storage": uri, "direction": "maximize",
                                        "sampler": {"name": "RandomSampler"}, "pruner": {"name": "NopPruner"},
                                        "heartbeat_interval": 60, "grace_period": None}))
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_store(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mlflow.db"
    return request.getfixturevalue("postgres_url")


def test_make_ui_prints_a_link_to_the_training_runs_of_each_project_experiment(tracking_uri, tmp_path):
    def links() -> list[str]:
        return subprocess.run([sys.executable, "scripts/ui_links.py", tracking_uri, "http://127.0.0.1:5000"],
                              cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.splitlines()

    assert links() == [f"no training runs in {tracking_uri} yet: after python train.py, make ui prints the link to "
                       "them"]
    experiment_id = track.setup(compose_config("tracking.experiment_name=flowers102",
                                               f"tracking.artifact_location={tmp_path}/art").tracking)
    mlflow.create_experiment("not-the-projects")  # no kind tag: no link
    assert links() == ["the training runs of flowers102: "
                       f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"]


@pytest.mark.parametrize("opener", ["mlflow", "optuna"])
def test_processes_that_open_a_fresh_store_together_all_succeed_and_leave_it_usable(fresh_store, opener, tmp_path):
    workers = 4
    (tmp_path / "barrier").mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_STORE_TOGETHER, fresh_store, str(tmp_path / "barrier"),
                                   str(workers), opener], cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
                 for _ in range(workers)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * workers, "\n".join(e[-1500:] for e in errors)
    if opener == "mlflow":
        client = mlflow.MlflowClient(tracking_uri=fresh_store)
        assert [e.name for e in client.search_experiments(filter_string="name = 'race'")] == ["race"]
        client.create_run(client.get_experiment_by_name("race").experiment_id)
    else:
        study = optuna.load_study(study_name="race", storage=fresh_store)
        assert [s.study_name for s in optuna.get_all_study_summaries(fresh_store)] == ["race"]
        study.tell(study.ask(), 1.0)


def test_run_name_says_backbone_techniques_lr_batch_size_and_seed():
    assert run_name(compose_config("backbone=mobilenet_v2_100_224", "lr=3e-4", "batch_size=64")) == \
        "mobilenet_v2_100_224-lr0.0003-bs64-seed42"
    assert run_name(compose_config("backbones=[mobilenet_v1_100_224,efficientnet_lite0_224]", "model.tta=flip",
                                   "trainer.cv_folds=5", "trainer.refit=true", "trainer.refit_budget=steps")) == \
        "mobilenet_v1_100_224+efficientnet_lite0_224-tta_flip-cv5-refit_steps-lr0.03-bs64-seed42"
    assert run_name(compose_config("model=logistic_regression", "backbone=mobilenet_v2_100_224", "seed=1")) == \
        "mobilenet_v2_100_224-logistic_regression-seed1"  # no lr or batch: scikit-learn takes neither
    assert run_name(compose_config("tracking.run_name=mine")) == "mine"


def test_tags_name_commit_data_device_and_versions():
    job = Job.from_config(compose_config("backbone=mobilenet_v1_100_224"))
    splits = load_splits(compose_config("data=synthetic").data)
    tags = track.run_tags(job, splits, tf.distribute.get_strategy())
    assert tags["backbone"] == "mobilenet_v1_100_224"
    assert (tags["dataset"], tags["dataset_version"]) == ("synthetic", splits.version)
    assert (tags["validation_split"], tags["test_split"]) == ("validation", "test")
    assert len(tags["git_commit"].removesuffix("-dirty")) == 40
    assert tags["device"] in ("CPU", "GPU") and tags["device.name"] and int(tags["device.count"]) >= 1
    assert (tags["strategy"], tags["replicas"], tags["precision"]) == ("default", "1", "float32")
    assert tags["keras_version"] == keras.__version__ and tags["mlflow_version"] == mlflow.__version__
    assert tags["tensorflow_version"] == tf.__version__


def test_epoch_metrics_are_logged_with_step_equal_to_epoch(tracking_uri):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(16, 2)), np.eye(2)[[0, 1] * 8]
    with mlflow.start_run() as run:
        model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0, callbacks=[track.EpochMetrics()])
    client = mlflow.MlflowClient()
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3]


def test_a_tracking_server_that_does_not_answer_is_one_line_at_once():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"no MLflow tracking server answers at {uri} .*make tracking-server"):
        track.setup(OmegaConf.create({"uri": uri, "experiment_name": "x", "artifact_location": None}))
