"""The one forward graph: the classifier, the feature extractor and classify_resized, from one Network."""

import numpy as np
import pytest
import tensorflow as tf

from src.backbone import HubFeatureVector
from src.model import Network, SplitUnitNormalization, build_head
from src.spec import Augmentation, Head
from tests.tiny_backbone import save_tiny_backbone

AUGMENT = Augmentation(enabled=True, horizontal_flip=True, rotation=0.05, zoom=0.1, contrast=0.1)
HEAD = Head("dense", dropout=0.0, normalize_features=True, label_smoothing=0.0)


@pytest.fixture(scope="module")
def network(tiny_backbone, tmp_path_factory):
    """Two tiny backbones of different widths and input sizes: images are decoded at the larger one."""
    wide = save_tiny_backbone(str(tmp_path_factory.mktemp("backbones") / "wide"), features=24, seed=1)
    return Network([HubFeatureVector(tiny_backbone, name="small", input_size=(32, 32)),
                    HubFeatureVector(wide, name="large", input_size=(48, 48))], (48, 48))


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(4, 48, 48, 3), dtype=np.uint8)


def test_raw_uint8_images_of_any_size_go_in_and_class_probabilities_come_out(network):
    model = network.classifier(build_head(5, HEAD, network.widths))
    assert model.input.dtype == "uint8" and network.widths == [16, 24]
    for shape in ((4, 50, 70, 3), (2, 20, 30, 3)):
        probabilities = model(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8), training=False)
        assert probabilities.shape == (shape[0], 5)
        np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1, rtol=1e-5)


def test_the_extractor_and_classify_resized_feed_the_head_as_the_classifier_does(network, images):
    head = build_head(5, HEAD, network.widths)
    expected = network.classifier(head)(images, training=False).numpy()
    features = network.extractor()(images)
    assert [features[name].shape[1] for name in ("small", "large")] == [16, 24]
    from_features = head(np.concatenate([features["small"], features["large"]], axis=1), training=False).numpy()
    np.testing.assert_allclose(from_features, expected, atol=1e-6)
    # features in the other order are another model: the order lives in the network, not in each caller
    swapped = head(np.concatenate([features["large"][:, :16], features["small"], features["large"][:, 16:]], axis=1))
    assert not np.allclose(swapped, expected, atol=1e-3)
    # TFLite's graph resizes the smaller backbone's input without antialiasing: close, not equal
    resized = network.classify_resized(head)(tf.constant(images)).numpy()
    np.testing.assert_allclose(resized, expected, atol=0.05)
    assert (resized.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.75


def test_augmentation_is_random_in_training_and_off_in_inference(network, images):
    model = network.classifier(build_head(5, HEAD, network.widths), AUGMENT, seed=0)
    np.testing.assert_array_equal(model(images, training=False), model(images, training=False))
    assert not np.allclose(model(images, training=True), model(images, training=False))
    plain = network.classifier(build_head(5, HEAD, network.widths))
    np.testing.assert_allclose(plain(images, training=True), plain(images, training=False), rtol=1e-6)


def test_each_backbones_features_are_unit_normalised_on_their_own():
    features = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    normalised = SplitUnitNormalization([3, 5])(features).numpy()
    np.testing.assert_allclose(np.linalg.norm(normalised[:, :3], axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(normalised[:, 3:], axis=1), 1, rtol=1e-6)
    scaled = features.copy()
    scaled[:, 3:] *= 100  # one backbone's scale no longer outweighs the other's
    np.testing.assert_allclose(SplitUnitNormalization([3, 5])(scaled), normalised, rtol=1e-5)


def test_the_head_is_built_for_the_features_it_receives():
    head = build_head(7, HEAD, [16, 24])
    assert head.input_shape == (None, 40) and head.output_shape == (None, 7)
    features = np.random.default_rng(0).normal(size=(2, 40)).astype(np.float32)
    np.testing.assert_allclose(head(features, training=False), head(features * 3, training=False), rtol=1e-5)
    unnormalised = build_head(7, Head("dense", 0.0, False, 0.0), [16, 24])
    assert not np.allclose(unnormalised(features, training=False), unnormalised(features * 3, training=False))
