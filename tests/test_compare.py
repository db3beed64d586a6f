"""The baseline as a model, and paired comparisons of runs: `model=logistic_regression` and scripts/compare.py on
synthetic data, with real runs in a real store."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from src.config import PROJECT_ROOT, UserError
from src.data import load_splits
from src.pipeline import run_job
from tests.conftest import TEST_HEAD, compose_config


@pytest.fixture(scope="module")
def runs(tiny_backbone, tmp_path_factory):
    """A logistic-regression run and a Keras-head run on the same synthetic images, and one on other images."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlflow.db"
    common = [*TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224", f"backbone.handle={tiny_backbone}",
              "backbone.name=tiny", "trainer.verbose=0", f"tracking.uri={uri}",
              f"tracking.artifact_location={tmp}/art", f"paths.cache_dir={tmp}/cache"]
    ids = {}
    for name, overrides in {"baseline": ["model=logistic_regression", "model.c_grid=[0.01,1,100]", "trainer.refit=true"],
                            "dense": ["epochs=3", "lr=0.02", "model.augmentation.enabled=false",
                                      "model.normalize_features=true", "model.tta=flip"],
                            "other_images": ["model=logistic_regression", "data.images_per_class.test=10"]}.items():
        metrics = run_job(compose_config(*common, *overrides), tmp / name)
        ids[name] = mlflow.last_active_run().info.run_id
        ids[name, "metrics"] = metrics
    yield uri, ids
    mlflow.set_tracking_uri(None)


def test_logistic_regression_is_a_model_of_the_project(runs):
    uri, ids = runs
    run = mlflow.get_run(ids["baseline"])
    metrics = ids["baseline", "metrics"]
    assert run.info.run_name == "tiny-logistic_regression-refit-seed42" and run.data.params["model.c_grid"] == "[0.01, 1, 100]"
    assert metrics["best_C"] in (0.01, 1, 100) and run.data.metrics["refit/stage1_C"] == metrics["best_C"]
    assert metrics["test/accuracy"] > 0.5  # four classes: chance is 0.25
    for key in ("test/accuracy_ci_low", "test/accuracy_ci_high", "test/mean_class_accuracy",
                "val/accuracy_ci_low", "val/mean_class_accuracy", "selection/score"):
        assert key in run.data.metrics
    assert run.data.metrics["test/accuracy_ci_low"] <= metrics["test/accuracy"] <= run.data.metrics["test/accuracy_ci_high"]
    # the grid on validation, one point per C
    history = mlflow.MlflowClient().get_metric_history(ids["baseline"], "c_grid/val_accuracy")
    assert len(history) == 3
    # how long lbfgs ran for each C, and the tolerance it ran to
    iterations = mlflow.MlflowClient().get_metric_history(ids["baseline"], "c_grid/iterations")
    assert len(iterations) == 3 and all(point.value >= 1 for point in iterations)
    assert run.data.params["model.tol"] == "1e-06"
    # its coefficients are the exported model's head: served = evaluated
    model = mlflow.pyfunc.load_model(f"runs:/{ids['baseline']}/model")
    images = [image.numpy() for image, _ in load_splits(compose_config("data=synthetic").data).test.take(12)]
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=ids["baseline"], artifact_path="test_predictions.csv"))
    served = model.predict(pd.DataFrame({"image": images}))
    assert list(served["label"]) == list(logged["predicted"][:12])
    np.testing.assert_allclose(served["score"], logged["confidence"][:12], atol=1e-4)


def compare(uri, *args):
    return subprocess.run([sys.executable, "scripts/compare.py", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def test_compare_prints_the_paired_figures_as_json(runs):
    uri, ids = runs
    result = compare(uri, ids["baseline"], ids["dense"], "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert set(out) == {"n", "accuracy_a", "accuracy_b", "difference", "ci_low", "ci_high", "p_value"}
    assert out["n"] == 80 and out["accuracy_a"] == pytest.approx(ids["baseline", "metrics"]["test/accuracy"])
    assert out["accuracy_b"] == pytest.approx(ids["dense", "metrics"]["test/accuracy"])
    assert out["difference"] == pytest.approx(out["accuracy_b"] - out["accuracy_a"])
    assert out["ci_low"] <= out["difference"] <= out["ci_high"] and 0 <= out["p_value"] <= 1
    one_view = json.loads(compare(uri, ids["baseline"], ids["dense"], "--json", "--one-view").stdout)
    assert one_view["accuracy_b"] == pytest.approx(ids["dense", "metrics"]["test/accuracy_single_view"])
    on_validation = json.loads(compare(uri, ids["baseline"], ids["dense"], "--json", "--split", "validation").stdout)
    assert on_validation["n"] == 80  # 20 validation images of each of 4 classes
    assert on_validation["accuracy_b"] == pytest.approx(ids["dense", "metrics"]["val/accuracy_tta"])  # as served
    one_view = json.loads(compare(uri, ids["baseline"], ids["dense"], "--json", "--split", "validation",
                                  "--one-view").stdout)
    assert one_view["accuracy_b"] == pytest.approx(ids["dense", "metrics"]["val/accuracy_best"])


def test_a_validation_file_from_before_it_held_the_test_time_views_compares_with_one_view_only(runs, tmp_path):
    uri, ids = runs
    mlflow.set_tracking_uri(uri)
    dense = mlflow.get_run(ids["dense"])
    frame = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=ids["dense"],
                                                            artifact_path="validation_predictions.csv"))
    frame.drop(columns="predicted").rename(columns={"predicted_single_view": "predicted"}).to_csv(
        tmp_path / "validation_predictions.csv", index=False)
    with mlflow.start_run(experiment_id=dense.info.experiment_id, tags=dense.data.tags) as older:
        mlflow.log_metric("val/accuracy_tta", dense.data.metrics["val/accuracy_tta"])
        mlflow.log_artifact(str(tmp_path / "validation_predictions.csv"))
    served = compare(uri, ids["baseline"], older.info.run_id, "--split", "validation")
    assert served.returncode == 1
    assert served.stderr.strip().splitlines()[-1] == (
        f"error: run {older.info.run_id} logged its validation predictions with one view only, before they held "
        "its test-time views; compare with --one-view")
    one_view = json.loads(compare(uri, ids["baseline"], older.info.run_id, "--json", "--split", "validation",
                                  "--one-view").stdout)
    assert one_view["accuracy_b"] == pytest.approx(ids["dense", "metrics"]["val/accuracy_best"])


def test_runs_on_different_images_are_refused_in_one_line(runs):
    uri, ids = runs
    result = compare(uri, ids["baseline"], ids["other_images"])
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: runs {ids['baseline']} and {ids['other_images']} were evaluated on "
                              "different images (synthetic 4classes-")
    assert "compare runs of the same dataset, version and split" in message
    assert compare(uri, ids["baseline"], "nope").stderr.strip().splitlines()[-1].startswith("error: no run nope")


@pytest.mark.parametrize("overrides, message", [
    (["model=logistic_regression", "model.augmentation.enabled=true"],
     "model=logistic_regression trains on cached features"),
    (["model=logistic_regression", "model.c_grid=[]"], "model.c_grid=[] is invalid: expected a list of positive numbers"),
    (["model.augmentation.enabled=false", "trainer.cv_folds=3", "finetune.enabled=true"],
     "trainer.cv_folds does not cross-validate fine-tuning"),
    (["model.augmentation.enabled=true", "trainer.cv_folds=3"], "trainer.cv_folds needs the cached-feature path"),
])
def test_bad_head_settings_are_one_line_errors_before_any_run(tiny_backbone, tracking_uri, tmp_path, overrides,
                                                              message):
    cfg = compose_config(*TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224", f"backbone.handle={tiny_backbone}",
                         f"tracking.uri={tracking_uri}", *overrides)
    with pytest.raises(UserError) as error:
        run_job(cfg, tmp_path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
