"""Devices, distribution and precision, for users with GPUs, exercised here on CPU: the mirrored strategy on two
logical CPU devices, the multi-worker strategy on two processes over loopback, and Keras mixed precision
(bfloat16 on a CPU)."""

import json
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
from src.serve import free_port
from src.spec import Job, tf_config
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
        assert_serves_its_logged_predictions(run["run_id"])


def assert_serves_its_logged_predictions(run_id: str) -> None:
    """The exported model, trained under a strategy, gives the predictions its evaluation logged."""
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv"))
    images = [image.numpy() for image, _ in load_splits(compose_config("data=synthetic").data).test.take(8)]
    scores = model.predict(pd.DataFrame({"image": images}))
    assert list(scores["label"]) == list(logged["predicted"][:8])
    assert np.allclose(scores["score"], logged["confidence"][:8], atol=1e-4)


@pytest.mark.slow  # about 70 s on two shared cores: three training processes
def test_multi_worker_strategy_trains_on_two_processes_and_only_the_chief_logs_and_exports(tmp_path, tiny_backbone):
    """Two workers over loopback, the chief given its cluster by trainer.cluster and the other by TF_CONFIG, next
    to one process with the same global batch, seed and initial weights."""
    ports = set()
    while len(ports) < 2:  # two picks in a row may return the same free port
        ports.add(free_port())
    workers = [f"127.0.0.1:{port}" for port in sorted(ports)]
    job = [sys.executable, "train.py", *FAST, f"backbone.handle={tiny_backbone}",
           "trainer.feature_cache=false", f"paths.cache_dir={tmp_path}/cache"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    stores = {name: f"sqlite:///{tmp_path}/{name}/mlflow.db" for name in ("workers", "single")}
    worker = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}
    runs = {  # name: (its store, arguments, environment)
        "chief": ("workers", ["trainer.strategy=multi_worker",
                              f"trainer.cluster={{workers:[{','.join(workers)}],index:0}}"], {}),
        "worker": ("workers", ["trainer.strategy=multi_worker"], {"TF_CONFIG": json.dumps(worker)}),
        "single": ("single", [], {}),
    }
    processes = {}
    try:
        for name, (store, args, extra) in runs.items():
            (tmp_path / name / "tmp").mkdir(parents=True)
            with open(tmp_path / f"{name}.log", "w") as log:
                processes[name] = subprocess.Popen(
                    [*job, *args, f"tracking.artifact_location={tmp_path}/{store}/art",
                     f"hydra.run.dir={tmp_path}/{name}/out"],
                    cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                    env={**env, **extra, "MLFLOW_TRACKING_URI": stores[store], "TMPDIR": str(tmp_path / name / "tmp")})
        for name, process in processes.items():
            assert process.wait(timeout=600) == 0, f"{name}: " + (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    run = only_run(stores["workers"])  # the chief's: the worker left no run
    tags = run.data.tags
    assert (tags["strategy"], tags["replicas"], tags["devices"]) == ("multi_worker", "2",
                                                                     "worker:0/CPU:0, worker:1/CPU:0")
    assert_serves_its_logged_predictions(run.info.run_id)
    # the worker exported into a temporary folder and logged into a temporary store, and removed both
    assert not list((tmp_path / "worker" / "tmp").iterdir())
    assert [p.name for p in (tmp_path / "worker" / "out").iterdir() if not p.name.startswith(".")] == ["train.log"]
    single = only_run(stores["single"])
    # Not bit for bit: under a strategy Keras draws a first batch to build the model, so the shuffle starts one
    # iteration later, and each replica draws its own dropout masks; the runs differ as two shuffles do. On these
    # 80 easy validation images both reach about 1.0 in 3 epochs: 0.05 (4 images) is room for that noise.
    assert abs(run.data.metrics["val/accuracy_best"] - single.data.metrics["val/accuracy_best"]) <= 0.05


def only_run(store: str) -> mlflow.entities.Run:
    mlflow.set_tracking_uri(store)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return run


def test_without_gpus_the_mirrored_strategy_spans_the_cpu_devices_and_default_is_one_device():
    assert make_strategy("default").num_replicas_in_sync == 1
    mirrored = make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(UserError, match="strategy='tpu' is unknown; use one of: default, mirrored, multi_worker$"):
        Job.from_config(compose_config("trainer.strategy=tpu"))


def test_the_cluster_comes_from_trainer_cluster_or_tf_config_and_a_bad_or_missing_one_is_a_one_line_error(monkeypatch):
    def cluster(*overrides):
        return json.loads(tf_config(compose_config("trainer.strategy=multi_worker", *overrides).trainer))

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cluster("trainer.cluster={workers:[10.0.0.1:2222,node2:2222],index:1}") == {
        "cluster": {"worker": ["10.0.0.1:2222", "node2:2222"]}, "task": {"type": "worker", "index": 1}}
    with pytest.raises(UserError, match=r"trainer.strategy=multi_worker needs the cluster: set trainer.cluster="):
        cluster()
    for bad in ("{workers:[node1:2222],index:1}", "{workers:[node1],index:0}", "{hosts:[node1:2222],index:0}"):
        with pytest.raises(UserError, match=r"^trainer.cluster=.* is invalid: expected trainer.cluster=\{workers:"):
            cluster(f"trainer.cluster={bad}")
    chief = {"cluster": {"chief": ["node1:2222"], "worker": ["node2:2222"]}, "task": {"type": "chief", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(chief))
    assert cluster() == chief
    for bad in ("{not json", json.dumps({**chief, "task": {"type": "ps", "index": 0}})):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(UserError, match=r"^TF_CONFIG=.* is invalid: expected"):
            cluster()
    assert tf_config(compose_config().trainer) is None  # read only for strategy=multi_worker


def test_multi_worker_refuses_a_sweep_before_its_run(tmp_path):
    """Each worker would start a sweep run of its own."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run([sys.executable, "train.py", "-m", "trainer.strategy=multi_worker",
                             f"hydra.sweep.dir={tmp_path}/multirun"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("error: trainer.strategy=multi_worker trains one job per "
                                                      "command; start each worker without -m")
    assert not (tmp_path / "mlflow.db").exists()


def test_multi_worker_refuses_the_cached_feature_path():
    cfg = compose_config("trainer.strategy=multi_worker", "trainer.cluster={workers:[node1:2222],index:0}",
                         "model=linear_probe")
    with pytest.raises(UserError, match="multi_worker trains end to end, .*: set trainer.feature_cache=false$"):
        Job.from_config(cfg)


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
