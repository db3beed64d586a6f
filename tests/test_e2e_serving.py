"""The issue's flow on the real offline data: a small sweep, make register-best, make serve-best, then
scripts/predict.py --url on real test photos. Slices of the splits keep it to a few minutes."""

import json
import os
import subprocess
import sys
import time

import mlflow
import pytest
import requests

from src.config import PROJECT_ROOT
from src.data import load_splits
from tests.conftest import compose_config
from tests.test_serve import free_port

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
    runs = mlflow.search_runs(experiment_names=["flowers102"], order_by=["metrics.`val/accuracy_best` DESC"])
    parent = runs[runs["tags.sweep"] == "true"].run_id.iloc[0]
    jobs = runs[runs["tags.mlflow.parentRunId"] == parent]
    assert len(jobs) == 2 and set(jobs["status"]) == {"FINISHED"}

    registered = run(env, "scripts/register_best.py", "--sweep", parent)
    assert "flowers version 1 (val accuracy" in registered.stdout and "is now the champion" in registered.stdout
    worse = run(env, "scripts/register_best.py", "--run-id", jobs.run_id.iloc[1])
    assert "does not beat the champion, version 1" in worse.stdout
    champion = mlflow.MlflowClient().get_model_version_by_alias("flowers", "champion")
    assert champion.run_id == jobs.run_id.iloc[0] and int(champion.version) == 1

    splits = load_splits(compose_config(f"data.data_dir={offline_data_dir}", *data).data)
    files, labels = [], []
    for i, (image, label) in enumerate(splits.test.take(PHOTOS)):
        files.append(str(tmp_path / f"photo_{i}.jpg"))
        (tmp_path / files[-1]).write_bytes(image.numpy())
        labels.append(int(label))

    port = free_port()
    server = subprocess.Popen([sys.executable, "scripts/serve_best.py", f"serve.port={port}"], cwd=PROJECT_ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                requests.get(f"{url}/ping", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        output = run(env, "scripts/predict.py", *files, "--url", url, "--json").stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
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
