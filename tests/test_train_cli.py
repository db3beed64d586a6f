"""End to end through the command line: `python train.py ...` on synthetic data with the tiny backbone."""

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from src.config import flatten
from src.data import load_splits
from tests.conftest import TEST_HEAD, compose_config
from tests.helpers import logged_runs as runs, make_image_folder, train_cli as train

FAST = [*TEST_HEAD, "backbone=mobilenet_v2_100_224", "backbone.name=tiny", "trainer.verbose=2"]


@pytest.fixture(scope="module")
def trained(tiny_backbone, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    overrides = ["data=synthetic", *FAST, f"backbone.handle={tiny_backbone}", "epochs=3", "lr=0.05",
                 "model.augmentation.enabled=false"]
    result = train(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs(tmp_path)
    return result, run, overrides


def test_one_finished_run_with_a_readable_name_and_every_param(trained):
    result, run, overrides = trained
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny-lr0.05-bs32-seed42"
    assert "test accuracy" in result.stdout + result.stderr
    expected = flatten(compose_config(*overrides, "backbone.handle=x"))
    assert set(run.data.params) == set(expected)
    assert run.data.params["lr"] == "0.05" and run.data.params["data.name"] == "synthetic"


def test_per_epoch_and_final_metrics(trained):
    _, run, _ = trained
    client = mlflow.MlflowClient()
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3]
    metrics = run.data.metrics
    for name in ("val/accuracy_best", "test/accuracy", "test/top5_accuracy", "test/loss", "time/train_s",
                 "time/eval_s"):
        assert np.isfinite(metrics[name]), name
    assert 0.01 < metrics["model/size_mb"] < 100  # the SavedModel, backbone included
    assert metrics["val/accuracy_best"] == pytest.approx(
        max(m.value for m in client.get_metric_history(run.info.run_id, "val/accuracy")), abs=1e-6)
    # on its grid of right answers out of 20 validation images, in float64 as scikit-learn's heads report it
    assert metrics["val/accuracy_best"] == round(metrics["val/accuracy_best"] * 20) / 20
    assert metrics["selection/score"] == metrics["val/accuracy_best"]
    assert metrics["selection/loss"] == metrics["val/nll"] != metrics["val/loss_at_best"]  # smoothing 0.1 left out
    assert metrics["test/accuracy"] >= 0.75  # four classes: chance is 0.25


def test_tags(trained):
    _, run, _ = trained
    tags = run.data.tags
    assert tags["backbone"] == "tiny" and tags["dataset"] == "synthetic"
    assert tags["dataset_version"] == "4classes-{'train': 40, 'validation': 20, 'test': 20}-48to96px"
    assert tags["device"] == "CPU" and tags["tensorflow_version"] == tf.__version__
    assert tags["git_commit"] and tags["keras_version"]


def test_artifacts(trained):
    _, run, _ = trained
    client = mlflow.MlflowClient()
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "per_class_accuracy.csv", "plots", "saved_model"} <= listed
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/training_curves.png", "plots/confusion_matrix.png", "plots/test_predictions.png"}
    per_class = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path="per_class_accuracy.csv"))
    assert list(per_class.class_name) == ["red", "green", "blue", "yellow"] and per_class.images.sum() == 80
    # the test evaluation as data, for reports: the confusion matrix and each test image's prediction, in order
    def download(name):
        return mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name)

    confusion = pd.read_csv(download("test_confusion_matrix.csv"), index_col="true")
    predictions = pd.read_csv(download("test_predictions.csv"), index_col="index")
    assert list(confusion.index) == list(confusion.columns) == ["red", "green", "blue", "yellow"]
    assert list(predictions.index) == list(range(80)) and list(predictions["label"]) == [0] * 20 + [1] * 20 + [2] * 20 + [3] * 20
    assert np.diag(confusion.to_numpy()).tolist() == per_class["correct"].tolist()
    assert (predictions["label"] == predictions["predicted"]).mean() == pytest.approx(run.data.metrics["test/accuracy"])
    assert predictions["confidence"].between(0.25, 1).all()


def test_logged_models_predict_the_test_images_from_jpeg_bytes(trained):
    _, run, _ = trained
    splits = load_splits(compose_config("data=synthetic").data)
    jpegs, labels = zip(*[(image.numpy(), int(label)) for image, label in splits.test])
    assert all(jpeg.startswith(b"\xff\xd8\xff") for jpeg in jpegs)

    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert pyfunc.metadata.get_input_schema().input_names() == ["image"]
    predicted = pyfunc.predict(pd.DataFrame({"image": list(jpegs)}))
    accuracy = float((predicted["label"].to_numpy() == np.array(labels)).mean())
    assert accuracy == pytest.approx(run.data.metrics["test/accuracy"])  # same preprocessing as evaluation
    assert set(predicted["class_name"]) <= {"red", "green", "blue", "yellow"}

    saved_model = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="saved_model/flowers/1")
    out = tf.saved_model.load(saved_model).signatures["serving_default"](image_bytes=tf.constant(list(jpegs)))
    np.testing.assert_array_equal(out["labels"].numpy()[:, 0], predicted["label"].to_numpy())


def _png(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["missing dataset", "unknown backbone", "missing backbone path", "non-image file",
                                  "invalid lr"])
def test_bad_input_gets_a_one_line_error_and_leaves_no_run(case, tiny_backbone, tmp_path):
    folder = make_image_folder(tmp_path / "images")
    (folder / "train" / "rose" / "readme.txt").write_text("hello")
    overrides = {
        "missing dataset": ["backbone=mobilenet_v2_100_224", f"data.data_dir={tmp_path}/empty", "data.download=false"],
        "unknown backbone": ["backbone=resnet9000"],
        "missing backbone path": ["data=synthetic", f"backbone.handle={tmp_path}/no_such_backbone"],
        "non-image file": ["data=image_folder", f"data.root={folder}", f"backbone.handle={tiny_backbone}"],
        "invalid lr": ["data=synthetic", f"backbone.handle={tiny_backbone}", "lr=-1"],
    }[case]
    result = train(tmp_path, *FAST, *overrides)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    expected = {"missing dataset": "not prepared in", "unknown backbone": "unknown backbone 'resnet9000'",
                "missing backbone path": "is not a SavedModel folder", "non-image file": "readme.txt is not a",
                "invalid lr": "lr=-1 is invalid"}[case]
    assert last.startswith("error: ") and expected in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert runs(tmp_path) == []
