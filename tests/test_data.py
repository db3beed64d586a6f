
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image

from src.config import UserError
from src.data import decode_and_resize, load_splits, make_batches
from tests.conftest import compose_config
from tests.helpers import encode, make_image_folder


def test_synthetic_splits_have_the_configured_classes_and_sizes():
    splits = load_splits(compose_config("data=synthetic").data)
    assert splits.class_names == ["red", "green", "blue", "yellow"]
    counts = {name: sum(1 for _ in getattr(splits, name)) for name in ("train", "validation", "test")}
    assert counts == {"train": 160, "validation": 80, "test": 80}
    labels = np.array([int(label) for _, label in splits.train])
    assert np.bincount(labels).tolist() == [40, 40, 40, 40]


def test_batches_are_uint8_at_the_backbone_size_and_shuffled_reproducibly():
    splits = load_splits(compose_config("data=synthetic").data)
    batches = make_batches(splits.train, (32, 40), 16, cache=True, shuffle_seed=1)
    images, labels = next(iter(batches))
    assert images.dtype == tf.uint8 and images.shape == (16, 32, 40, 3)
    first = [labels.numpy() for _, labels in make_batches(splits.train, (32, 40), 16, shuffle_seed=1)]
    again = [labels.numpy() for _, labels in make_batches(splits.train, (32, 40), 16, shuffle_seed=1)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), np.sort(np.concatenate(first)))


@pytest.mark.parametrize("fmt, array, mode", [
    ("JPEG", np.full((30, 50, 3), 200, np.uint8), None),
    ("PNG", np.full((30, 50), 200, np.uint8), "L"),          # grayscale
    ("PNG", np.dstack([np.full((30, 50, 3), 200, np.uint8), np.full((30, 50), 255, np.uint8)]), "RGBA"),
    ("BMP", np.full((30, 50, 3), 200, np.uint8), None),
])
def test_decode_and_resize_gives_rgb_of_the_requested_size(fmt, array, mode):
    image = decode_and_resize(tf.constant(encode(array, fmt, mode)), (20, 24))
    assert image.dtype == tf.uint8 and image.shape == (20, 24, 3)
    assert abs(int(image.numpy().mean()) - 200) <= 2


def test_transparent_pixels_are_put_on_white_as_a_viewer_shows_them():
    rgba = np.zeros((20, 30, 4), np.uint8)  # black everywhere; opaque on the left, half and fully transparent right
    rgba[:, :10, 3], rgba[:, 10:20, 3], rgba[:, 20:, 3] = 255, 128, 0
    for mode in ("RGBA", "LA"):
        image = Image.fromarray(rgba, "RGBA").convert(mode)
        pixels = decode_and_resize(tf.constant(encode(np.asarray(image), "PNG", mode)), (20, 30)).numpy()
        assert (pixels[:, :8] == 0).all() and (pixels[:, 22:] == 255).all()
        assert (np.abs(pixels[:, 12:18].astype(int) - 127) <= 1).all()


def image_folder_cfg(root):
    return OmegaConf.merge(compose_config("data=image_folder").data, {"root": str(root)})


def test_image_folder_reads_classes_from_folder_names(tmp_path):
    splits = load_splits(image_folder_cfg(make_image_folder(tmp_path)))
    assert splits.class_names == ["daisy", "rose"]
    images, labels = next(iter(make_batches(splits.test, (16, 16), 6)))
    assert images.shape == (6, 16, 16, 3)
    # Class "rose" was drawn brighter: the labels follow the folders.
    brightness = images.numpy().mean(axis=(1, 2, 3))
    assert (brightness[labels.numpy() == 1] > brightness[labels.numpy() == 0].max()).all()


@pytest.mark.parametrize("name, content", [("notes.txt", b"not an image"), ("fake.jpg", b"<html>oops</html>")])
def test_image_folder_rejects_a_non_image_file_by_name(tmp_path, name, content):
    root = make_image_folder(tmp_path)
    (root / "validation" / "rose" / name).write_bytes(content)
    with pytest.raises(UserError, match=rf"{name} is not a JPEG/PNG/BMP/GIF image; remove it"):
        load_splits(image_folder_cfg(root))


def test_image_folder_version_changes_when_an_image_moves_to_another_class(tmp_path):
    root = make_image_folder(tmp_path)
    before = load_splits(image_folder_cfg(root)).version
    assert load_splits(image_folder_cfg(root)).version == before
    (root / "train" / "daisy" / "0.jpeg").rename(root / "train" / "rose" / "9.jpeg")
    assert load_splits(image_folder_cfg(root)).version != before


def test_image_folder_errors_name_the_missing_folder(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; lay out images as .*/<split>/<class>/\*\.jpg"):
        load_splits(image_folder_cfg(tmp_path / "nowhere"))
    root = make_image_folder(tmp_path / "data")
    (root / "test" / "tulip").mkdir()
    with pytest.raises(UserError, match="class folder .*tulip is not in the train split"):
        load_splits(image_folder_cfg(root))


def test_a_missing_tfds_dataset_says_how_to_fix_it(tmp_path):
    cfg = compose_config(f"data.data_dir={tmp_path}", "data.download=false").data
    with pytest.raises(UserError, match=r"oxford_flowers102 is not prepared in .*; set TFDS_DATA_DIR or data.data_dir"):
        load_splits(cfg)


@pytest.mark.e2e
def test_offline_oxford_flowers102_has_the_official_splits(offline_data_dir):
    splits = load_splits(compose_config(f"data.data_dir={offline_data_dir}").data)
    assert len(splits.class_names) == 102 and splits.class_names[0] == "pink primrose"
    assert (splits.name, splits.version) == ("oxford_flowers102", "2.1.1")
    sizes = {s: int(getattr(splits, s).cardinality()) for s in ("train", "validation", "test")}
    assert sizes == {"train": 1020, "validation": 1020, "test": 6149}
    train_labels = [int(label) for _, label in splits.train]
    assert np.bincount(train_labels).tolist() == [10] * 102
    images, _ = next(iter(make_batches(splits.test, (224, 224), 4)))
    assert images.shape == (4, 224, 224, 3)
