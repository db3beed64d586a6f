import time

import keras
import numpy as np
import pytest

from src.backbone import HubFeatureVector, load_backbone
from src.config import UserError
from tests.conftest import compose_config
from tests.tiny_backbone import FEATURES


def fit_one_step(layer: HubFeatureVector, images: np.ndarray) -> None:
    model = keras.Sequential([keras.Input((None, None, 3)), layer, keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    model.fit(images, np.ones((len(images), 2)), epochs=1, verbose=0)


def snapshot(layer: HubFeatureVector) -> dict[str, np.ndarray]:
    return {v.name: np.array(v.numpy()) for v in layer.weights}


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(size=(8, 40, 40, 3)).astype("float32")


def test_frozen_backbone_has_no_trainable_weights_and_does_not_change(tiny_backbone, images):
    layer = HubFeatureVector(tiny_backbone)
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 3
    before = snapshot(layer)
    fit_one_step(layer, images)
    assert all(np.array_equal(before[k], v) for k, v in snapshot(layer).items())


def test_trainable_backbone_trains_its_weights_with_adam_and_keeps_batchnorm_frozen(tiny_backbone, images):
    layer = HubFeatureVector(tiny_backbone, trainable=True)
    assert sorted(v.name for v in layer.trainable_weights) == ["bn_gamma", "conv_kernel"]
    before = snapshot(layer)
    fit_one_step(layer, images)
    after = snapshot(layer)
    assert not np.array_equal(before["conv_kernel"], after["conv_kernel"])
    np.testing.assert_array_equal(before["bn_moving_mean"], after["bn_moving_mean"])


def test_train_batchnorm_updates_the_moving_statistics(tiny_backbone, images):
    layer = HubFeatureVector(tiny_backbone, trainable=True, train_batchnorm=True)
    before = snapshot(layer)
    fit_one_step(layer, images)
    assert not np.array_equal(before["bn_moving_mean"], snapshot(layer)["bn_moving_mean"])


def test_keras_variables_wrap_the_modules_variables(tiny_backbone):
    layer = HubFeatureVector(tiny_backbone, trainable=True)
    layer.trainable_weights[0].assign(np.zeros(layer.trainable_weights[0].shape))
    module_kernel = next(v for v in layer._module.variables if v.name.startswith("conv/kernel"))
    assert not module_kernel.numpy().any()


def test_any_input_size_gives_one_feature_vector_per_image(tiny_backbone):
    layer = HubFeatureVector(tiny_backbone)
    assert layer(np.zeros((3, 57, 91, 3), "float32")).shape == (3, FEATURES)


def test_a_handle_that_is_not_a_savedmodel_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"backbone handle .*nowhere is not a SavedModel folder .*FLOWERS_BACKBONES_DIR"):
        HubFeatureVector(str(tmp_path / "nowhere"))


def test_an_unreachable_tfhub_handle_fails_fast_with_an_offline_alternative():
    start = time.monotonic()
    with pytest.raises(UserError, match=r"cannot reach hub\.invalid .*use an offline backbone"):
        HubFeatureVector("https://hub.invalid/google/imagenet/mobilenet_v2_100_224/feature_vector/5")
    assert time.monotonic() - start < 30


@pytest.mark.e2e
@pytest.mark.parametrize("name, features", [("mobilenet_v2_100_224", 1280), ("mobilenet_v1_100_224", 1024)])
def test_offline_backbones_load_from_their_config(offline_backbones_dir, name, features):
    layer = load_backbone(compose_config(f"backbone={name}").backbone)
    out = layer(np.random.default_rng(0).uniform(size=(2, 224, 224, 3)).astype("float32")).numpy()
    assert out.shape == (2, features) and (out >= 0).all() and (out <= 6).all()
