"""Devices, distribution and precision, for users with GPUs, exercised here on CPU: the mirrored strategy on two
logical CPU devices, and Keras mixed precision (bfloat16 on a CPU)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from src.config import PROJECT_ROOT, UserError
from src.data import load_splits
from src.pipeline import run_job
from src.spec import Job
from src.train import make_strategy, precision
from tests.conftest import TEST_HEAD, compose_config

FAST = [*TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224", "backbone.name=tiny", "trainer.verbose=0", "epochs=3",
        "lr=0.05", "model.augmentation.enabled=false"]


def test_mirrored_strategy_trains_on_two_logical_cpu_devices_with_and_without_the_feature_cache(tmp_path, tiny_backbone):
    """Two jobs in one process: through the backbone (its variables mirrored) and on cached features."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *FAST, f"backbone.handle={tiny_backbone}", "trainer.strategy=mirrored",
         "trainer.cpu_devices=2", "trainer.feature_cache=false,true", f"tracking.artifact_location={tmp_path}/art",
         f"paths.cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/multirun/{uuid.uuid4().hex[:8]}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.strategy = 'mirrored'")
    assert sorted(runs["tags.feature_cache"]) == ["false", "true"] and set(runs["status"]) == {"FINISHED"}
    for _, run in runs.iterrows():
        assert (run["tags.replicas"], run["tags.device.count"], run["tags.devices"]) == ("2", "2", "CPU:0, CPU:1")
        assert run["metrics.test/accuracy"] >= 0.75  # four classes: chance is 0.25
        # the exported model, trained under the strategy, gives the predictions its evaluation logged
        model = mlflow.pyfunc.load_model(f"runs:/{run['run_id']}/model")
        logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run["run_id"],
                                                                 artifact_path="test_predictions.csv"))
        images = [image.numpy() for image, _ in load_splits(compose_config("data=synthetic").data).test.take(8)]
        scores = model.predict(pd.DataFrame({"image": images}))
        assert list(scores["label"]) == list(logged["predicted"][:8])
        assert np.allclose(scores["score"], logged["confidence"][:8], atol=1e-4)


def test_without_gpus_the_mirrored_strategy_spans_the_cpu_devices_and_default_is_one_device():
    assert make_strategy("default").num_replicas_in_sync == 1
    mirrored = make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(UserError, match="trainer.strategy='tpu' is unknown; use one of: default, mirrored"):
        Job.from_config(compose_config("trainer.strategy=tpu"))


def test_cpu_devices_that_tensorflow_cannot_take_any_more_are_a_one_line_error(synthetic_cfg, tmp_path):
    tf.constant(1)  # TensorFlow has started, with its devices
    count = len(tf.config.list_logical_devices("CPU"))
    for devices, message in ((count + 1, f"trainer.cpu_devices={count + 1}: TensorFlow already started with {count} CPU"),
                             (0, r"trainer.cpu_devices=0 is invalid: expected null or a positive integer")):
        cfg = synthetic_cfg.copy()
        cfg.merge_with({"trainer": {"cpu_devices": devices}})
        with pytest.raises(UserError, match=message):
            run_job(cfg, tmp_path)
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # stopped before a run


def test_mixed_precision_is_true_or_false():
    with pytest.raises(UserError, match="trainer.mixed_precision='fp16' is invalid: expected true or false"):
        Job.from_config(compose_config("trainer.mixed_precision=fp16"))


def test_mixed_precision_trains_the_head_in_bfloat16_on_cpu_and_restores_the_policy(synthetic_cfg, tmp_path):
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"epochs": 3, "lr": 0.05, "model": {"augmentation": {"enabled": False}},
                    "trainer": {"mixed_precision": True, "feature_cache": False}})
    keras.config.set_dtype_policy("float64")  # whatever the process had before the job, it gets back
    try:
        metrics = run_job(cfg, tmp_path)
        assert keras.config.dtype_policy().name == "float64"
    finally:
        keras.config.set_dtype_policy("float32")
    assert metrics["test/accuracy"] >= 0.75
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["precision"] == "mixed_bfloat16"
    # the exported SavedModel returns float32 scores that rank the classes like the run's evaluation
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="test_predictions.csv"))
    images = [image.numpy() for image, _ in load_splits(cfg.data).test.take(8)]
    scores = model.predict(pd.DataFrame({"image": images}))
    assert list(scores["label"]) == list(predictions["predicted"][:8])
    assert np.allclose(scores["score"], predictions["confidence"][:8], atol=2e-2)  # bfloat16 head: ~3 digits


def test_under_mixed_precision_the_head_computes_in_bfloat16_with_float32_weights_and_softmax():
    from src.model import build_head

    with precision(True):
        head = build_head(4, Job.from_config(compose_config()).head, [8])
    dense, softmax = head.layers[-2], head.layers[-1]
    assert (dense.compute_dtype, dense.kernel.dtype, softmax.compute_dtype) == ("bfloat16", "float32", "float32")
    assert head(np.ones((2, 8), "float32")).dtype == "float32"


def test_profile_logs_a_tensorflow_profiler_trace_of_training_steps_to_the_run(synthetic_cfg, tmp_path):
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"epochs": 1, "batch_size": 16, "model": {"augmentation": {"enabled": False}},
                    "trainer": {"profile": True}})
    run_job(cfg, tmp_path)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tensorboard",
                                                dst_path=str(tmp_path / "download"))
    traces = list(Path(local).rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].parent.parent.name == "profile" and traces[0].stat().st_size > 1000
