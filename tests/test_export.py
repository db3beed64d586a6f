import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
import tensorflow as tf
from PIL import Image

from src.data import decode_and_resize
from src.pyfunc_model import FlowerClassifier
from tests.helpers import export_tiny

CLASSES = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]


def encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tiny_backbone, tmp_path_factory):
    return export_tiny(tiny_backbone, CLASSES, tmp_path_factory.mktemp("export") / "flowers" / "1")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [encode(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8), fmt)
            for i, fmt in enumerate(["JPEG", "PNG", "JPEG"])]


def test_savedmodel_is_in_tf_serving_layout(exported):
    _, path = exported
    assert path.name == "1" and path.parent.name == "flowers"
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()


def test_serving_signature_takes_image_bytes_and_returns_top_k(exported, images):
    model, path = exported
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["image_bytes"]
    out = serve(image_bytes=tf.constant(images))
    assert out["labels"].shape == out["scores"].shape == out["class_names"].shape == (3, 5)
    scores = out["scores"].numpy()
    assert (np.diff(scores, axis=1) <= 0).all()
    names = [[CLASSES[label] for label in row] for row in out["labels"].numpy()]
    assert names == [[n.decode() for n in row] for row in out["class_names"].numpy()]
    # Same preprocessing as training: identical to the Keras model on decode_and_resize'd pixels.
    pixels = tf.stack([decode_and_resize(b, (32, 32)) for b in images])
    expected = tf.math.top_k(model(pixels, training=False), k=5)
    np.testing.assert_allclose(scores, expected.values.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(out["labels"].numpy(), expected.indices.numpy())


def test_tf_serving_rest_json_with_b64_instances(exported, images):
    """The body a TF Serving REST client sends, decoded the way TF Serving decodes it."""
    _, path = exported
    body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in images]})
    instances = [base64.b64decode(instance["b64"]) for instance in json.loads(body)["instances"]]
    out = tf.saved_model.load(str(path)).signatures["serving_default"](image_bytes=tf.constant(instances))
    assert out["labels"].shape == (3, 5)


def test_top_k_is_capped_at_the_number_of_classes(tiny_backbone, tmp_path):
    _, path = export_tiny(tiny_backbone, CLASSES[:3], tmp_path / "m" / "1")
    out = tf.saved_model.load(str(path)).signatures["serving_default"](
        image_bytes=tf.constant([encode(np.zeros((9, 9, 3), np.uint8), "PNG")]))
    assert sorted(out["labels"].numpy()[0].tolist()) == [0, 1, 2]


def test_the_model_names_its_classes_in_label_order(exported):
    _, path = exported
    names = tf.saved_model.load(str(path)).signatures["class_names"]()["class_names"].numpy()
    assert [n.decode() for n in names] == CLASSES
    assert FlowerClassifier.from_saved_model(str(path)).class_names == CLASSES


def test_pyfunc_predicts_one_row_per_image_with_top_k(exported, images):
    _, path = exported
    out = FlowerClassifier.from_saved_model(str(path)).predict(None, pd.DataFrame({"image": images}))
    assert list(out.columns) == ["class_name", "label", "score", "top_k"] and len(out) == 3
    for _, row in out.iterrows():
        assert len(row.top_k) == 5 and row.top_k[0] == {"class_name": row.class_name, "label": row.label,
                                                         "score": row.score}
        assert CLASSES[row.label] == row.class_name


def test_pyfunc_reads_base64_text_and_says_when_it_is_not(exported, images):
    _, path = exported
    model = FlowerClassifier.from_saved_model(str(path))
    as_text = model.predict(None, pd.DataFrame({"image": [base64.b64encode(images[0]).decode()]}))
    assert as_text["label"][0] == model.predict(None, pd.DataFrame({"image": images[:1]}))["label"][0]
    with pytest.raises(MlflowException, match="image 0 is not valid base64"):
        model.predict(None, pd.DataFrame({"image": ["QUJDR"]}))
