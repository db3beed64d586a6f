"""`make serve-best RUNTIME=openvino|tflite`: a champion trained on synthetic data with test-time views, its
runtime models made on demand, and real servers answering as the SavedModel does."""

import os
import sys

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest

from src import register
from src.data import load_splits
from src.pipeline import run_job
from src.serve import free_port
from tests.conftest import TEST_HEAD, compose_config
from tests.helpers import running
from tests.test_serve import BAD, b64, invoke, split

pytest.importorskip("openvino", reason="no openvino: make install-all installs it")


@pytest.fixture(scope="module")
def store(tiny_backbone, tmp_path_factory):
    """A champion with flip test-time views (its run's config says so), its test images and their labels."""
    tmp = tmp_path_factory.mktemp("runtimes")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    cfg = compose_config(*TEST_HEAD, "data=synthetic", "backbone=mobilenet_v2_100_224",
                         f"backbone.handle={tiny_backbone}", "backbone.name=tiny", "epochs=3", "lr=0.05",
                         "model.tta=flip", "trainer.verbose=0", f"tracking.artifact_location={tmp}/artifacts",
                         f"paths.cache_dir={tmp}/cache")
    run_job(cfg, tmp / "job")
    register.register_best(mlflow.MlflowClient(), cfg.tracking.experiment_name, "flowers")
    test = list(load_splits(cfg.data).test.shard(5, 0))
    yield {"uri": uri, "runtimes_dir": tmp / "runtimes", "images": [image.numpy() for image, _ in test],
           "labels": [int(label) for _, label in test]}
    mlflow.set_tracking_uri(None)


def serve(store, *overrides, output=None):
    port = free_port()
    return running([sys.executable, "scripts/serve_best.py", f"serve.port={port}", "serve.max_images=4",
                    "serve.max_body_mb=1", f"paths.runtimes_dir={store['runtimes_dir']}", *overrides], port,
                   {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}, timeout=300, output=output)


def predictions(url, images):
    return [p for i in range(0, len(images), 4) for p in invoke(url, split(*map(b64, images[i:i + 4]))).json()
            ["predictions"]]


def workers_of(server: psutil.Process) -> list[psutil.Process]:
    """uvicorn's worker processes (spawned by multiprocessing), alive."""
    alive = []
    for child in server.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def saved_model_answers(store):
    model = mlflow.pyfunc.load_model("models:/flowers@champion")
    return model.predict(pd.DataFrame({"image": store["images"]})).to_dict("records")


@pytest.mark.parametrize("runtime, workers", [("tflite", 1), ("tflite_int8_dynamic", 1), ("tflite_float16", 1),
                                               ("openvino", 2)])
def test_each_runtime_answers_with_the_saved_models_json_and_its_4xx(store, saved_model_answers, runtime, workers):
    output = []
    with serve(store, f"serve.runtime={runtime}", f"serve.workers={workers}", output=output) as url:
        server = next(p for p in psutil.Process().children() if "scripts/serve_best.py" in p.cmdline())
        got = predictions(url, store["images"])
        statuses = {case: invoke(url, body) for case, (body, _, _) in BAD.items()}
        assert len(workers_of(server)) >= (workers if workers > 1 else 0)
    folder = store["runtimes_dir"] / "flowers-v1"
    assert (folder / "int8.tflite").is_file() and (folder / "openvino.xml").is_file()  # made on demand
    comparison = pd.read_csv(folder / "comparison.csv")
    assert f"{runtime} agreed with the SavedModel on " in output[0]  # printed before it serves
    assert comparison.loc[0, "test/accuracy"] == pytest.approx(
        mlflow.get_run(mlflow.MlflowClient().get_model_version("flowers", "1").run_id).data.metrics["test/accuracy"])
    assert len(got) == len(saved_model_answers) == len(store["images"]) >= 15
    for g, want in zip(got, saved_model_answers):
        assert list(g) == ["class_name", "label", "score", "top_k"]
        assert len(g["top_k"]) == len(want["top_k"]) == 4  # top 5 of 4 classes
        assert [list(t) for t in g["top_k"]] == [["class_name", "label", "score"]] * 4
        assert g["class_name"] == g["top_k"][0]["class_name"] and g["score"] == g["top_k"][0]["score"]
    agreement = np.mean([g["label"] == w["label"] for g, w in zip(got, saved_model_answers)])
    assert agreement >= 0.9, agreement
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in saved_model_answers], atol=0.1)
    for case, (_, status, message) in BAD.items():
        assert statuses[case].status_code == status, (case, statuses[case].text[:300])
        assert message in statuses[case].json()["message"], case


def test_the_runtime_serves_the_mean_over_the_models_test_time_views(store):
    import tensorflow as tf

    from src import runtimes

    model = mlflow.pyfunc.load_model("models:/flowers@champion")
    predictor = model.unwrap_python_model()
    path = store["runtimes_dir"] / "flowers-v1"
    runtimes.serve_with(predictor, "tflite", path, model.metadata.run_id)
    images = tf.constant(store["images"][:8])
    served = predictor._serve(images)
    pixels = predictor._serve.decode(images)["images"].numpy()
    classifier = runtimes.Classifier(path / "int8.tflite")
    one_view = classifier({"images": pixels})
    expected = (one_view + classifier({"images": np.ascontiguousarray(pixels[:, :, ::-1])})) / 2  # and its mirror
    assert not np.allclose(expected, one_view)
    np.testing.assert_allclose(served["scores"].numpy(), -np.sort(-expected, axis=1), rtol=1e-6)
    assert (served["labels"].numpy()[:, 0] == expected.argmax(axis=1)).all()
    assert [n.decode() for n in served["class_names"].numpy()[:, 0]] == [
        predictor.class_names[i] for i in expected.argmax(axis=1)]


@pytest.mark.parametrize("override, message", [
    ("serve.runtime=onnx", "serve.runtime='onnx' is invalid: expected savedmodel, openvino, tflite, tflite_int8_dynamic, tflite_float16"),
    ("serve.workers=0", "serve.workers=0 is invalid: expected a positive integer"),
    ("serve.threads=0", "serve.threads=0 is invalid: expected a positive integer or null"),
])
def test_an_unknown_runtime_no_workers_or_no_threads_is_a_one_line_error(store, override, message):
    import subprocess

    from src.config import PROJECT_ROOT
    result = subprocess.run([sys.executable, "scripts/serve_best.py", override], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
