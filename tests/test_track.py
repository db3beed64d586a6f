import keras
import mlflow
import numpy as np

from src import track
from tests.conftest import compose_config


def test_setup_creates_the_experiment_with_a_local_artifact_location(tracking_uri, tmp_path):
    cfg = compose_config("tracking.experiment_name=exp-a", f"tracking.artifact_location={tmp_path}/art").tracking
    experiment_id = track.setup(cfg)
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.name == "exp-a" and experiment.artifact_location.endswith(f"{tmp_path}/art")
    assert track.setup(cfg) == experiment_id  # found, not created twice
    assert mlflow.get_tracking_uri() == tracking_uri


def test_run_name_says_backbone_lr_and_batch_size():
    assert track.run_name(compose_config("backbone=mobilenet_v2_100_224", "lr=3e-4", "batch_size=64")) == \
        "mobilenet_v2_100_224-lr0.0003-bs64"
    assert track.run_name(compose_config("tracking.run_name=mine")) == "mine"


def test_tags_name_commit_data_device_and_versions():
    tags = track.run_tags(compose_config("backbone=mobilenet_v1_100_224"), "oxford_flowers102", "2.1.1")
    assert tags["backbone"] == "mobilenet_v1_100_224"
    assert (tags["dataset"], tags["dataset_version"]) == ("oxford_flowers102", "2.1.1")
    assert len(tags["git_commit"].removesuffix("-dirty")) == 40
    assert tags["device"] in ("CPU", "GPU") and tags["device.name"] and int(tags["device.count"]) >= 1
    assert tags["keras_version"] == keras.__version__


def test_epoch_metrics_are_logged_with_step_equal_to_epoch(tracking_uri):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(16, 2)), np.eye(2)[[0, 1] * 8]
    with mlflow.start_run() as run:
        model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0, callbacks=[track.EpochMetrics()])
    client = mlflow.MlflowClient()
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3]
