"""The issue's flow on the real offline data: a small sweep, make register-best, make serve-best, then
scripts/predict.py --url on real test photos. Slices of the splits keep it to a few minutes."""

import json
import os
import subprocess
import sys

import mlflow
import pytest

from src.config import PROJECT_ROOT
from src.data import load_splits
from tests.conftest import compose_config
from src.serve import free_port
from tests.helpers import running

SLICES = {"train": "train[:50%]", "validation": "validation[:30%]", "test": "test[:200]"}
PHOTOS = 30


def run(env, *command, timeout=900):
    result = subprocess.run([sys.executable, *command], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.e2e
def test_sweep_register_serve_and_predict_real_photos(offline_data_dir, offline_backbones_dir, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TFDS_DATA_DIR": offline_data_dir,
           "FLOWERS_CACHE_DIR": str(tmp_path / "cache")}
    data = [f'data.splits.{split}="{s}"' for split, s in SLICES.items()]
    run(env, "train.py", "-m", "backbone=mobilenet_v2_100_224", "lr=0.003,0.03", "batch_size=64", "epochs=30",
        "model.augmentation.enabled=false", "model.normalize_features=true", "trainer.verbose=0", *data,
        f"tracking.artifact_location={tmp_path}/art", f"hydra.sweep.dir={tmp_path}/multirun")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["flowers102"])
    [parent] = [row for _, row in runs[runs["tags.sweep"] == "true"].iterrows()]
    jobs = runs[runs["tags.mlflow.parentRunId"] == parent.run_id]
    assert len(jobs) == 2 and set(jobs["status"]) == {"FINISHED"}
    best = parent["tags.best_run_id"]  # the sweep's own choice: val accuracy, then val loss
    [other] = set(jobs.run_id) - {best}

    registered = run(env, "scripts/register_best.py", "--sweep", parent.run_id)
    assert "flowers version 1 (val/accuracy_best 0." in registered.stdout and "is now the champion" in registered.stdout
    worse = run(env, "scripts/register_best.py", "--run-id", other)
    assert "does not beat the champion, version 1" in worse.stdout
    champion = mlflow.MlflowClient().get_model_version_by_alias("flowers", "champion")
    assert champion.run_id == best and int(champion.version) == 1

    splits = load_splits(compose_config(f"data.data_dir={offline_data_dir}", *data).data)
    files, labels = [], []
    for i, (image, label) in enumerate(splits.test.take(PHOTOS)):
        files.append(str(tmp_path / f"photo_{i}.jpg"))
        (tmp_path / files[-1]).write_bytes(image.numpy())
        labels.append(int(label))

    port = free_port()
    with running([sys.executable, "scripts/serve_best.py", f"serve.port={port}"], port, env) as url:
        output = run(env, "scripts/predict.py", *files, "--url", url, "--json").stdout
    predictions = [json.loads(line) for line in output.splitlines()]
    assert [p["file"] for p in predictions] == files
    in_top5 = [label in [t["label"] for t in p["top_k"]] for p, label in zip(predictions, labels)]
    confident = [(p["top_k"][0]["label"] == label) for p, label in zip(predictions, labels)
                 if p["top_k"][0]["score"] >= 0.5]
    names = splits.class_names
    assert all(t["class_name"] == names[t["label"]] for p in predictions for t in p["top_k"])
    print(f"top-5 {sum(in_top5)}/{PHOTOS}; top-1 right on {sum(confident)}/{len(confident)} clear photos")
    assert sum(in_top5) >= 0.8 * PHOTOS
    assert len(confident) >= 5 and sum(confident) >= 0.9 * len(confident)
