"""The shifts of photos from elsewhere, and the random views trained against them: each is deterministic for a
seed and changes the image as it says."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from src import augment, shifts
from src.data import decode_and_resize, make_batches
from src.views import image_view, viewed_images


@pytest.fixture(scope="module")
def photo():
    """A 120 x 160 test card: a bright disc (the flower) on a darker, textured background."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:120, :160]
    image = np.clip(rng.normal(70, 20, (120, 160, 3)), 0, 255)
    disc = (y - 60) ** 2 + (x - 80) ** 2 < 35 ** 2
    image[disc] = [230, 200, 40]
    return tf.constant(image.astype(np.uint8))


def disc_fraction(image) -> float:
    """The share of the frame the yellow disc takes."""
    pixels = np.asarray(image).astype(int)
    return float(((pixels[..., 0] > 215) & (pixels[..., 1] > 185) & (pixels[..., 2] < 70)).mean())


@pytest.mark.parametrize("condition", shifts.CONDITIONS)
def test_each_shift_is_deterministic_for_a_seed_and_changes_the_image(photo, condition):
    first = shifts.apply(photo, condition, index=3).numpy()
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    np.testing.assert_array_equal(first, shifts.apply(photo, condition, index=3).numpy())
    if first.shape == photo.shape:
        assert np.abs(first.astype(int) - photo.numpy()).mean() > 1, condition


def test_the_draws_depend_on_the_image_index_and_the_seed(photo):
    by_index = {shifts.apply(photo, "off_centre:2", index=i).numpy().tobytes() for i in range(6)}
    assert len(by_index) > 1
    assert not np.array_equal(shifts.apply(photo, "off_centre:2", 0, seed=1), shifts.apply(photo, "off_centre:2", 0, seed=2))


def test_zoom_out_makes_the_flower_smaller_in_the_frame_the_more_severe(photo):
    fractions = [disc_fraction(shifts.apply(photo, f"zoom_out:{s}", index=0)) for s in shifts.SEVERITIES]
    full = disc_fraction(photo)
    # the disc's area scales with the square of the side: 0.75, 0.55, 0.4
    np.testing.assert_allclose(fractions, [full * 0.75 ** 2, full * 0.55 ** 2, full * 0.4 ** 2], rtol=0.15)


def disc_centre(image) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 215) & (pixels[..., 1] > 185) & (pixels[..., 2] < 70))
    return np.array([ys.mean() / pixels.shape[0], xs.mean() / pixels.shape[1]])


def test_off_centre_crops_move_the_flower_off_centre_and_low_resolution_shrinks_the_photo(photo):
    for index in range(5):
        cropped = shifts.apply(photo, "off_centre:3", index=index)
        assert np.abs(disc_centre(cropped) - 0.5).max() > 0.15  # the disc, once in the middle, is now off it
        assert np.abs(disc_centre(photo) - 0.5).max() < 0.01
    small = shifts.apply(photo, "low_resolution:3", index=0)
    assert tuple(small.shape) == (40, 53, 3)  # the short side at 40 pixels, the aspect kept


def test_colour_brightness_blur_and_jpeg_change_what_they_say(photo):
    original = photo.numpy().astype(float)
    warm_or_cool = shifts.apply(photo, "colour_temperature:3", index=0).numpy().astype(float)
    red_vs_blue = (warm_or_cool[..., 0] - warm_or_cool[..., 2]).mean() - (original[..., 0] - original[..., 2]).mean()
    assert abs(red_vs_blue) > 10  # red and blue pulled apart, one way or the other
    for index in range(4):  # darker or brighter, the contrast cut to 35 %: spread relative to the mean falls
        changed = shifts.apply(photo, "brightness_contrast:3", index=index).numpy().astype(float)
        assert changed.std() / changed.mean() < 0.6 * original.std() / original.mean()
        assert abs(changed.mean() - original.mean()) > 0.25 * original.mean()
    blurred = shifts.apply(photo, "blur:3", index=0).numpy().astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(original, axis=1)).mean()
    low_quality = shifts.apply(photo, "jpeg:3", index=0).numpy().astype(float)
    assert 2 < np.abs(low_quality - original).mean() < 40


def test_rotation_turns_the_photo_and_keeps_its_size(photo):
    turned = shifts.apply(photo, "rotation:3", index=0).numpy()
    assert turned.shape == photo.shape
    # a 45-degree turn moves the corner content; the disc at the centre stays about the same size
    assert disc_fraction(turned) == pytest.approx(disc_fraction(photo), rel=0.1)
    assert not np.array_equal(turned[:10, :10], photo.numpy()[:10, :10])


def test_random_views_are_seeded_crops_zoom_outs_colour_jitter_and_mirrors(photo):
    views = [augment.random_view(photo, tf.constant([7, i], tf.int64)).numpy() for i in range(40)]
    assert all(v.shape == photo.shape and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[0], augment.random_view(photo, tf.constant([7, 0], tf.int64)).numpy())
    assert len({v.tobytes() for v in views}) == 40
    fractions = np.array([disc_fraction(v) for v in views])
    full = disc_fraction(photo)
    assert (fractions < 0.9 * full).any() and (fractions > 1.1 * full).any()  # zoom-outs and crops both occur
    floats = augment.random_view(tf.cast(photo, tf.float32) / 255, tf.constant([7, 0], tf.int64)).numpy()
    np.testing.assert_allclose(floats * 255, views[0], atol=1.01)  # the same view of a [0, 1] image


@pytest.mark.parametrize("policy", augment.POLICIES)
def test_the_random_views_layer_draws_fresh_views_in_training_only(photo, policy):
    layer = augment.RandomViews(seed=3, policy=policy)
    batch = tf.cast(tf.stack([photo, photo]), tf.float32) / 255
    np.testing.assert_array_equal(layer(batch, training=False), batch)
    first, second = layer(batch, training=True).numpy(), layer(batch, training=True).numpy()
    assert first.shape == batch.shape and not np.allclose(first, second)
    assert not np.allclose(first[0], first[1])  # each image of the batch its own view


IDENTITY = augment.Policy(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), zoom_out=0.0, brightness=0.0, contrast=0.0,
                          saturation=0.0, temperature=0.0, flip=0.0)


def sharpness(image) -> float:
    return float(np.abs(np.diff(np.asarray(image).astype(float), axis=1)).mean())


def test_the_broad_policys_camera_steps_do_what_they_say(photo):
    draw = tf.constant([5, 1], tf.int64)
    np.testing.assert_array_equal(augment.random_view(photo, draw, IDENTITY), photo)  # nothing on: the photo itself
    turned = augment.random_view(photo, draw, dataclasses.replace(IDENTITY, rotation=30.0)).numpy()
    assert disc_fraction(turned) == pytest.approx(disc_fraction(photo), rel=0.1)
    assert not np.array_equal(turned, photo.numpy())
    for step in ("low_resolution", "blur"):
        changed = augment.random_view(photo, draw, dataclasses.replace(IDENTITY, **{step: 1.0}))
        assert changed.shape == photo.shape and sharpness(changed) < 0.7 * sharpness(photo), step
    compressed = augment.random_view(photo, draw, dataclasses.replace(IDENTITY, jpeg=1.0)).numpy().astype(float)
    assert 1 < np.abs(compressed - photo.numpy()).mean() < 40


def test_the_broad_policy_is_seeded_and_keeps_the_standard_views_draws(photo):
    broad = augment.POLICIES["broad"]
    views = [augment.random_view(photo, tf.constant([7, i], tf.int64), broad).numpy() for i in range(20)]
    np.testing.assert_array_equal(views[3], augment.random_view(photo, tf.constant([7, 3], tf.int64), broad))
    assert all(v.shape == photo.shape and v.dtype == np.uint8 for v in views)
    standard = [augment.random_view(photo, tf.constant([7, i], tf.int64)).numpy() for i in range(20)]
    assert sum(np.array_equal(b, s) for b, s in zip(views, standard)) == 0
    # on average the broad views are softer: a quarter of them each small, blurred or compressed
    assert np.mean([sharpness(v) for v in views]) < np.mean([sharpness(v) for v in standard])


@pytest.mark.parametrize("name", ["random0", "random1-broad", "shift:blur:2", "shift:jpeg:3", "shift:low_resolution:2"])
def test_image_views_reach_the_model_as_their_lossless_png_would(photo, name):
    """The views stay decoded: the same pixels as encoding each as a PNG and decoding that as any photo."""
    photos = [tf.io.encode_jpeg(photo), tf.io.encode_png(photo[:90, 20:])]
    images = tf.data.Dataset.from_tensor_slices((tf.stack(photos), tf.constant([0, 1], tf.int64)))
    sizes = {"small": (24, 32), "large": (60, 40)}
    batch, _ = next(iter(make_batches(viewed_images(images, name, seed=5), sizes, 2)))
    for i, encoded in enumerate(photos):
        through_png = decode_and_resize(tf.io.encode_png(image_view(encoded, name, i, seed=5)), sizes)
        for size in sizes:
            np.testing.assert_array_equal(batch[size][i], through_png[size])
