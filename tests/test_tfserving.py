"""TF Serving: the exported layout and config, the signature with the JSON a REST client sends, the Dockerfiles.
Docker cannot run here, so TF Serving itself is not started; its REST decoding of {"b64": ...} is done below."""

import base64
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from src import register
from src.config import PROJECT_ROOT
from src.selection import LOSS, SCORE
from tests.helpers import CLASSES, JPEG, PHOTO, encode


@pytest.fixture(scope="module")
def exported(champion_store, tmp_path_factory):
    """`make export-tfserving` on the champion_store of tests/test_serve.py, whose champion is version 1; then a second,
    better version becomes the champion and is exported beside it."""
    uri, _ = champion_store
    out = tmp_path_factory.mktemp("tfserving")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    def export():
        result = subprocess.run([sys.executable, "scripts/export_tfserving.py", "--output", str(out)],
                                cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result
    first = export()
    return out, first


def test_layout_is_versioned_by_the_registry_version_with_a_config_that_pins_it(exported):
    out, result = exported
    assert "flowers version 1" in result.stdout
    assert sorted(p.name for p in (out / "flowers").iterdir()) == ["1"]
    assert (out / "flowers" / "1" / "saved_model.pb").is_file() and (out / "flowers" / "1" / "variables").is_dir()
    config = text_format.Parse((out / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("flowers", "/models/flowers", "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [1]


def tf_serving_rest(signature, body: str) -> str:
    """What TF Serving does with a REST predict request in the row ("instances") format for a model with one
    input: each instance is that input's value, {"b64": ...} is decoded to bytes; outputs are zipped per row."""
    instances = json.loads(body)["instances"]
    inputs = [base64.b64decode(i["b64"]) if isinstance(i, dict) else i for i in instances]
    outputs = {k: v.numpy() for k, v in signature(image_bytes=tf.constant(inputs)).items()}
    rows = [{k: (v[i].astype(str) if v.dtype.kind in "SO" else v[i]).tolist() for k, v in outputs.items()}
            for i in range(len(inputs))]
    return json.dumps({"predictions": rows})


def test_the_signature_answers_the_json_a_tf_serving_client_sends(exported, champion_store):
    out, _ = exported
    images = [JPEG, encode(PHOTO.convert("RGBA"), "PNG")]
    body = json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in images]})
    signature = tf.saved_model.load(str(out / "flowers" / "1")).signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["image_bytes"]
    assert signature.structured_input_signature[1]["image_bytes"].dtype == tf.string  # TF Serving's b64 target
    predictions = json.loads(tf_serving_rest(signature, body))["predictions"]
    assert len(predictions) == 2
    pyfunc = mlflow.pyfunc.load_model("models:/flowers@champion")
    expected = pyfunc.predict(__import__("pandas").DataFrame({"image": images}))
    for row, want in zip(predictions, expected.itertuples()):
        assert row["class_names"] == [t["class_name"] for t in want.top_k]
        assert row["labels"] == [CLASSES.index(n) for n in row["class_names"]]
        np.testing.assert_allclose(row["scores"], [t["score"] for t in want.top_k], rtol=1e-5)


def test_the_saved_model_needs_nothing_but_tensorflow(exported, tmp_path):
    """TF Serving has no Python: load and call it in an isolated interpreter (-I: no project on the path)
    that imports only TensorFlow, from a folder outside the project."""
    out, _ = exported
    code = ("import sys, tensorflow as tf; f = tf.saved_model.load(sys.argv[1]).signatures['serving_default'];"
            "print(f(image_bytes=tf.constant([open(sys.argv[2], 'rb').read()]))['class_names'].shape);"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('src', 'mlflow')))")
    (tmp_path / "probe.jpg").write_bytes(JPEG)
    result = subprocess.run([sys.executable, "-I", "-c", code, str(out / "flowers" / "1"), "probe.jpg"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, modules = result.stdout.strip().splitlines()[-2:]
    assert shape == "(1, 3)"
    assert modules == "[]"  # neither the project nor MLflow was needed


def test_a_new_champion_is_exported_beside_the_old_version_and_the_config_follows_it(exported, champion_store):
    out, _ = exported
    uri, saved = champion_store
    from src.export import log_pyfunc_model
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("flowers102")
    with mlflow.start_run():
        mlflow.log_metrics({SCORE: 0.9, LOSS: 0.5})
        log_pyfunc_model(saved, [JPEG])
    assert register.register_best(mlflow.MlflowClient(), "flowers102", "flowers").champion.version in (2, "2")
    result = subprocess.run([sys.executable, "scripts/export_tfserving.py", "--output", str(out)], cwd=PROJECT_ROOT,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (out / "flowers").iterdir()) == ["1", "2"]
    config = text_format.Parse((out / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert list(config.model_config_list.config[0].model_version_policy.specific.versions) == [2]


def test_without_a_champion_the_export_fails_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/export_tfserving.py", "--output", str(tmp_path / "o")],
                            cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model 'flowers' has no champion")
    assert not (tmp_path / "o").exists()


def test_the_dockerfiles_pass_hadolint():
    dockerfiles = sorted((PROJECT_ROOT / "docker").glob("*.Dockerfile"))
    assert [d.name for d in dockerfiles] == ["tfserving.Dockerfile", "train.Dockerfile"]
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", *map(str, dockerfiles)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FROM tensorflow/serving:" in dockerfiles[0].read_text()
