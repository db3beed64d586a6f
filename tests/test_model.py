import numpy as np
import pytest

from src.backbone import HubFeatureVector
from src.model import build_model
from tests.conftest import compose_config


def make_model(tiny_backbone, *overrides):
    cfg = compose_config(*overrides).model
    return build_model(HubFeatureVector(tiny_backbone, name="tiny"), (32, 32), 5, cfg, seed=0)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(4, 50, 70, 3), dtype=np.uint8)


def test_raw_uint8_images_of_any_size_go_in_and_class_probabilities_come_out(tiny_backbone, images):
    model = make_model(tiny_backbone)
    assert model.input.dtype == "uint8"
    probabilities = model(images, training=False).numpy()
    assert probabilities.shape == (4, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert model(images[:, :20, :30], training=False).shape == (4, 5)


def test_layers_run_in_order_resize_scale_augment_backbone_head(tiny_backbone):
    names = [layer.name for layer in make_model(tiny_backbone).layers]
    assert names == ["image", "resize", "scale", "augmentation", "tiny", "head"]
    assert [type(layer).__name__ for layer in make_model(tiny_backbone).get_layer("head").layers] == ["Dropout", "Dense", "Activation"]


def test_augmentation_is_active_only_in_training(tiny_backbone, images):
    model = make_model(tiny_backbone, "model.dropout=0")
    np.testing.assert_array_equal(model(images, training=False), model(images, training=False))
    assert not np.allclose(model(images, training=True), model(images, training=False))


def test_augmentation_can_be_switched_off(tiny_backbone, images):
    model = make_model(tiny_backbone, "model.dropout=0", "model.augmentation.enabled=false")
    assert "augmentation" not in [layer.name for layer in model.layers]
    np.testing.assert_allclose(model(images, training=True), model(images, training=False), rtol=1e-6)


def test_the_head_can_unit_normalize_the_features(tiny_backbone):
    model = make_model(tiny_backbone, "model.normalize_features=true")
    kinds = [type(layer).__name__ for layer in model.get_layer("head").layers]
    assert kinds == ["UnitNormalization", "Dropout", "Dense", "Activation"]


def test_augmentation_layers_follow_the_config(tiny_backbone):
    model = make_model(tiny_backbone, "model.augmentation.zoom=0", "model.augmentation.horizontal_flip=false")
    kinds = [type(layer).__name__ for layer in model.get_layer("augmentation").layers]
    assert kinds == ["RandomRotation", "RandomContrast"]
