"""Photos from elsewhere: scripts/evaluate.py scores a logged model on a labelled folder, through the model as
served, and logs an evaluation run; folder names and bad files get one-line errors."""

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from src.config import PROJECT_ROOT
from src.data import load_splits
from src.pipeline import run_job
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def model(tiny_backbone, tmp_path_factory):
    """A logistic regression on the synthetic colours, and the store it is logged in."""
    tmp = tmp_path_factory.mktemp("external")
    uri = f"sqlite:///{tmp}/mlflow.db"
    run_job(compose_config("data=synthetic", "model=logistic_regression", "backbone=mobilenet_v2_100_224",
                           f"backbone.handle={tiny_backbone}", "backbone.name=tiny", f"tracking.uri={uri}",
                           f"tracking.artifact_location={tmp}/art", f"paths.cache_dir={tmp}/cache"), tmp / "job")
    run_id = mlflow.last_active_run().info.run_id
    yield uri, f"runs:/{run_id}/model", run_id
    mlflow.set_tracking_uri(None)


@pytest.fixture
def folder(tmp_path):
    """The synthetic test photos of three of the four classes, under folder names spelled as people do."""
    names = {"red": "Red", "green": "GREEN", "blue": "blue"}
    splits = load_splits(compose_config("data=synthetic").data)
    for i, (image, label) in enumerate(splits.test):
        name = splits.class_names[int(label)]
        if name in names:
            (tmp_path / "photos" / names[name]).mkdir(parents=True, exist_ok=True)
            (tmp_path / "photos" / names[name] / f"{i}.jpg").write_bytes(image.numpy())
    return tmp_path / "photos"


def evaluate(uri, *args):
    return subprocess.run([sys.executable, "scripts/evaluate.py", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def evaluation_runs():
    """The ids of the evaluation runs in the current store (the module's tests share one)."""
    return {run.info.run_id for run in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                                          filter_string="tags.evaluation = 'true'")}


def test_a_labelled_folder_is_scored_as_served_and_logged_as_an_evaluation_run(model, folder):
    uri, model_uri, run_id = model
    mlflow.set_tracking_uri(uri)
    before = evaluation_runs()
    result = evaluate(uri, "--model-uri", model_uri, "--folder", str(folder), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"n", "accuracy", "ci_low", "ci_high", "mean_class_accuracy"} and out["n"] == 60
    # the same images, as the training run evaluated them: its logged test predictions for these three classes
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv"))
    kept = logged[logged["label"] < 3]
    assert out["accuracy"] == pytest.approx((kept["label"] == kept["predicted"]).mean())
    assert out["ci_low"] <= out["accuracy"] <= out["ci_high"]

    [run] = [mlflow.get_run(run_id) for run_id in evaluation_runs() - before]
    assert run.data.params["model_uri"] == model_uri and run.data.metrics["n"] == 60
    assert run.data.metrics["accuracy"] == pytest.approx(out["accuracy"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion.csv", "confusion.png", "predictions.csv"} <= artifacts
    confusion = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="confusion.csv"),
                            index_col="true")
    assert list(confusion.index) == ["red", "green", "blue"] and confusion.to_numpy().sum() == 60
    assert ("mistakes.jpg" in artifacts) == (out["accuracy"] < 1)


def test_folder_names_that_are_no_class_of_the_model_say_which_are_closest(model, folder):
    uri, model_uri, _ = model
    (folder / "Red").rename(folder / "redd")
    result = evaluate(uri, "--model-uri", model_uri, "--folder", str(folder))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "error: folder 'redd' is not a class of the model (closest: red, green); rename or remove it"


@pytest.mark.parametrize("content, message", [
    (b"these are notes, not a photo", "is not an image; send JPEG, PNG, GIF, BMP, WEBP"),
    (None, "is truncated or corrupt"),
])
def test_bad_files_get_the_served_models_messages_and_nothing_is_logged(model, folder, content, message):
    uri, model_uri, _ = model
    mlflow.set_tracking_uri(uri)
    before = evaluation_runs()
    bad = folder / "blue" / "bad.jpg"
    good = next((folder / "blue").iterdir()).read_bytes()
    bad.write_bytes(content if content is not None else good[: len(good) // 2])
    result = evaluate(uri, "--model-uri", model_uri, "--folder", str(folder))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {bad}: image ") and message in line and line.endswith("remove or replace the file")
    assert evaluation_runs() == before
