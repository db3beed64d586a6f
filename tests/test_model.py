"""The one forward graph: the classifier, the feature extractor and classify_resized, from one Network."""

import numpy as np
import pytest
import tensorflow as tf

from src.backbone import HubFeatureVector
from src.data import decode_and_resize
from src.model import Network, SplitUnitNormalization, build_head
from src.spec import Augmentation, Head
from tests.tiny_backbone import save_tiny_backbone

AUGMENT = Augmentation(enabled=True, horizontal_flip=True, rotation=0.05, zoom=0.1, contrast=0.1)
HEAD = Head("dense", dropout=0.0, normalize_features=True, label_smoothing=0.0)


@pytest.fixture(scope="module")
def network(tiny_backbone, tmp_path_factory):
    """Two tiny backbones of different widths and input sizes: each gets the image decoded at its own size."""
    wide = save_tiny_backbone(str(tmp_path_factory.mktemp("backbones") / "wide"), features=24, seed=1)
    return Network([HubFeatureVector(tiny_backbone, name="small", input_size=(32, 32)),
                    HubFeatureVector(wide, name="large", input_size=(48, 48))], (48, 48))


@pytest.fixture
def images():
    """The same photos decoded at each backbone's size."""
    photos = np.random.default_rng(0).integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    encoded = [tf.io.encode_png(photo) for photo in photos]
    return {name: tf.stack([decode_and_resize(e, size) for e in encoded])
            for name, size in {"images_32x32": (32, 32), "images_48x48": (48, 48)}.items()}


def test_raw_uint8_images_of_any_size_go_in_and_class_probabilities_come_out(network):
    model = network.classifier(build_head(5, HEAD, network.widths))
    assert network.image_sizes == {"images_32x32": (32, 32), "images_48x48": (48, 48)}
    assert all(x.dtype == "uint8" for x in model.inputs) and network.widths == [16, 24]
    for shape in ((4, 50, 70, 3), (2, 20, 30, 3)):
        raw = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        probabilities = model({"images_32x32": raw, "images_48x48": raw}, training=False)
        assert probabilities.shape == (shape[0], 5)
        np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1, rtol=1e-5)


def test_one_size_takes_one_image_and_each_backbone_sees_its_own_decode(network, images):
    small, large = network.backbones
    assert Network([small], (48, 48)).image_sizes == (32, 32)  # a backbone's own size wins over the model's
    assert Network([small, small], (32, 32)).image_sizes == (32, 32)
    # in the pair, the small backbone's features are those it computes alone: decoded at 32, not resized from 48
    alone = Network([small], (32, 32)).extractor()(images["images_32x32"])
    np.testing.assert_allclose(network.extractor()(images)["small"], alone["small"], atol=1e-6)
    from_48 = Network([small], (32, 32)).extractor()(images["images_48x48"])["small"]
    assert not np.allclose(from_48, alone["small"], atol=1e-4)


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
    # TFLite's graph, without resize layers: images decoded at each size need none
    np.testing.assert_allclose(network.classify_resized(head)(images).numpy(), expected, atol=1e-5)


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
