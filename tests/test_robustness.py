"""Training and selecting for photos from elsewhere, on synthetic data: random views in the feature cache,
multi-scale TTA in the served model, selection on the shifted validation images, the shifted test metrics, and
scripts/robustness.py on any model."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from src import shifts
from src.config import PROJECT_ROOT
from src.data import load_splits
from src.pipeline import run_job
from tests.conftest import TEST_HEAD, compose_config

PER_CLASS = 2  # shifted samples of 8 images: 24 conditions x 8 = 192 shifted photos


def job(synthetic_cfg, **changes):
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"epochs": 4, "lr": 0.02, "robustness": {"per_class": PER_CLASS},
                    "model": {"augmentation": {"enabled": False}, "normalize_features": True}})
    cfg.merge_with(changes)
    return cfg


@pytest.fixture(scope="module")
def robust_run(tiny_backbone, tmp_path_factory):
    """Random views, multi-scale TTA, selection on the mean of clean and shifted validation, shifted test."""
    tmp = tmp_path_factory.mktemp("robust")
    cfg = compose_config(*TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224", f"backbone.handle={tiny_backbone}",
                         "backbone.name=tiny", "epochs=4", "lr=0.02", "trainer.verbose=0",
                         "model.augmentation.enabled=false", "model.normalize_features=true",
                         "model.train_views=random:2", "model.tta=multiscale", "trainer.select_on=mean",
                         f"robustness.per_class={PER_CLASS}", "robustness.measure=true",
                         f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/art",
                         f"paths.cache_dir={tmp}/cache")
    metrics = run_job(cfg, tmp / "job")
    run = mlflow.last_active_run()
    yield cfg, metrics, run, tmp
    mlflow.set_tracking_uri(None)


def test_selection_on_shifted_validation_is_the_runs_score_and_its_early_stopping(robust_run):
    _, metrics, run, _ = robust_run
    assert run.info.run_name == "tiny-tta_multiscale-views_random2-select_mean-lr0.02-bs32-seed42"
    assert run.data.tags["selection.metric"] == "val/mean_accuracy_best"
    assert metrics["selection/score"] == pytest.approx(
        (metrics["val/accuracy_best"] + metrics["val/shifted_accuracy_best"]) / 2)
    history = {name: {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, name)}
               for name in ("val/accuracy", "val/shifted_accuracy", "val/selection")}
    assert len(history["val/shifted_accuracy"]) == metrics["epochs_trained"]
    best = max(history["val/selection"], key=lambda step: (history["val/selection"][step], -step))
    assert metrics["best_epoch"] == best  # the first epoch with the best mean of clean and shifted
    for step, value in history["val/selection"].items():
        assert value == pytest.approx((history["val/accuracy"][step] + history["val/shifted_accuracy"][step]) / 2)


def test_the_shifted_metrics_cover_every_condition_and_test_never_selects(robust_run):
    _, metrics, _, _ = robust_run
    assert {f"shifted/val/{c.replace(':', '_')}" for c in shifts.CONDITIONS} <= set(metrics)
    per_condition = [metrics[f"shifted/test/{c.replace(':', '_')}"] for c in shifts.CONDITIONS]
    assert len(per_condition) == 24 and metrics["shifted/test/accuracy"] == pytest.approx(np.mean(per_condition))
    assert metrics["shifted/test/accuracy_ci_low"] <= metrics["shifted/test/accuracy"] <= \
        metrics["shifted/test/accuracy_ci_high"]


def test_random_views_are_cached_per_seed_and_the_served_model_runs_the_multiscale_views(robust_run):
    cfg, _, run, tmp = robust_run
    files = sorted((tmp / "cache" / "features").glob("*.npz"))
    again = run_job(cfg, tmp / "again")  # the same job: every feature read back, the same numbers
    assert sorted((tmp / "cache" / "features").glob("*.npz")) == files
    assert again["test/accuracy"] == mlflow.get_run(run.info.run_id).data.metrics["test/accuracy"]
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = [image.numpy() for image, _ in load_splits(compose_config("data=synthetic").data).test.take(8)]
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="test_predictions.csv"))
    served = model.predict(pd.DataFrame({"image": images}))
    assert list(served["label"]) == list(logged["predicted"][:8])
    np.testing.assert_allclose(served["score"], logged["confidence"][:8], atol=1e-4)


def test_another_seed_draws_other_random_views(robust_run):
    cfg, _, _, tmp = robust_run
    before = set((tmp / "cache" / "features").glob("*.npz"))
    other = cfg.copy()
    other.merge_with({"seed": 7, "robustness": {"measure": False}, "trainer": {"select_on": "clean"}})
    run_job(other, tmp / "seed7")
    added = set((tmp / "cache" / "features").glob("*.npz")) - before
    assert len(added) == 2  # train/random0 and train/random1 for seed 7; the rest is shared
    other.merge_with({"model": {"view_policy": "broad"}})
    run_job(other, tmp / "broad")
    assert len(set((tmp / "cache" / "features").glob("*.npz")) - before - added) == 2  # the policy is in the key


def test_robustness_script_scores_any_model_under_every_shift(robust_run):
    _, _, run, tmp = robust_run
    result = subprocess.run([sys.executable, "scripts/robustness.py", "--model-uri", f"runs:/{run.info.run_id}/model",
                             "--per-class", str(PER_CLASS), "--json"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["n"] == 4 * PER_CLASS and {"clean/accuracy", "shifted/accuracy", "shifted/blur_3"} <= set(out)
    # the same sample and conditions as the run's own shifted test metrics, through the served model
    assert out["shifted/accuracy"] == pytest.approx(run.data.metrics["shifted/test/accuracy"], abs=1e-9)
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    [logged] = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`evaluation.kind` = 'robustness'",
                                  output_format="list")
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(logged.info.run_id)} >= {
        "robustness.csv", "robustness.md", "robustness.png"}


def test_select_on_shifted_needs_the_cached_path(synthetic_cfg, tmp_path):
    from src.config import UserError

    with pytest.raises(UserError, match="trainer.select_on=shifted selects on cached features"):
        run_job(job(synthetic_cfg, trainer={"select_on": "shifted"}, model={"augmentation": {"enabled": True}}),
                tmp_path)
