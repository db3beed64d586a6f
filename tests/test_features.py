import shutil

import mlflow
import numpy as np
import pytest

from src import features
from src.backbone import HubFeatureVector
from src.data import load_splits, make_batches
from src.model import Network
from src.pipeline import run_job
from src.spec import Job
from tests.conftest import compose_config
from tests.tiny_backbone import save_tiny_backbone


def test_the_cache_applies_only_to_a_frozen_backbone_without_augmentation():
    def uses(*overrides):
        return Job.from_config(compose_config("backbone=mobilenet_v2_100_224", *overrides)).uses_feature_cache
    assert uses()  # the default: frozen, augmentation off
    assert not uses("model.augmentation.enabled=true")
    assert not uses("backbone.trainable=true")
    assert not uses("trainer.feature_cache=false")


@pytest.fixture
def splits():
    return load_splits(compose_config("data=synthetic").data)


def cache_files(tmp_path):
    return sorted((tmp_path / "features").glob("*.npz"))


def test_features_are_computed_once_then_read_back(tiny_backbone, splits, tmp_path):
    network = Network([HubFeatureVector(tiny_backbone, name="tiny")], (32, 32))
    computed = features.load(network, splits, {"train": ("identity",), "test": ("identity", "flip")}, 16, tmp_path)
    x, labels = computed.get("train")
    assert x.shape == (160, 16) and computed.widths == (16,) and np.bincount(labels).tolist() == [40] * 4
    images, _ = next(iter(make_batches(splits.train, (32, 32), 160)))
    np.testing.assert_allclose(x, network.extractor().predict(images, verbose=0)["tiny"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(computed.get("test", "flip")[0], computed.get("test")[0])
    files = cache_files(tmp_path)
    assert len(files) == 3 and not list((tmp_path / "features").glob("*partial*"))  # no partial file left behind
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = features.load(network, splits, {"train": ("identity",), "test": ("identity", "flip")}, 16, tmp_path)
    np.testing.assert_array_equal(again.get("train")[0], x)
    assert [p.stat().st_mtime_ns for p in cache_files(tmp_path)] == mtimes  # read, not rewritten


def test_the_key_changes_with_everything_that_changes_the_features(tiny_backbone, splits, tmp_path):
    def files_for(backbones, input_size, cache, data=splits, view="identity"):
        features.load(Network(backbones, input_size), data, {"test": (view,)}, 16, cache)
        return {p.name for p in cache_files(cache)}

    tiny = HubFeatureVector(tiny_backbone, name="tiny")
    original = files_for([tiny], (32, 32), tmp_path)
    assert files_for([tiny], (32, 32), tmp_path) == original
    assert files_for([tiny], (40, 40), tmp_path / "size") != original  # another input size
    assert files_for([tiny], (32, 32), tmp_path / "view", view="flip") != original
    other_split = load_splits(compose_config("data=synthetic", "data.images_per_class.test=10").data)
    assert files_for([tiny], (32, 32), tmp_path / "version", data=other_split) != original
    # a backbone with its own size is decoded at it, whatever the model's size or the other backbones: one key
    own_size = HubFeatureVector(tiny_backbone, name="tiny", input_size=(32, 32))
    larger = HubFeatureVector(tiny_backbone, name="larger", input_size=(40, 40))
    assert files_for([own_size], (48, 48), tmp_path / "decoded") == original
    assert files_for([own_size, larger], (48, 48), tmp_path / "decoded") == original | files_for([larger], (40, 40),
                                                                                                 tmp_path / "alone")

    copy = shutil.copytree(tiny_backbone, tmp_path / "copy")
    moved = files_for([HubFeatureVector(str(copy), name="tiny")], (32, 32), tmp_path / "copy_cache")
    assert moved != original  # another handle
    shutil.rmtree(copy)
    save_tiny_backbone(str(copy), seed=1)
    changed = files_for([HubFeatureVector(str(copy), name="tiny")], (32, 32), tmp_path / "changed_cache")
    assert changed != moved  # same handle, other weights


def test_the_key_follows_the_networks_preprocessing_not_a_hand_written_version(tiny_backbone, splits, tmp_path,
                                                                              monkeypatch):
    network = Network([HubFeatureVector(tiny_backbone, name="tiny")], (32, 32))
    features.load(network, splits, {"test": ("identity",)}, 16, tmp_path)
    before = {p.name for p in cache_files(tmp_path)}
    original = network.preprocessing

    def without_antialias(backbone):
        resize, scale = original(backbone)
        resize.antialias = False
        return [resize, scale]
    monkeypatch.setattr(network, "preprocessing", without_antialias)
    features.load(network, splits, {"test": ("identity",)}, 16, tmp_path)
    assert {p.name for p in cache_files(tmp_path)} - before  # new features, not the stale ones


def test_folds_are_stratified_disjoint_and_cover_train_and_validation():
    labels = np.repeat(np.arange(6), [10, 10, 12, 15, 20, 25])
    folds = features.fold_indices(labels, 5, seed=3)
    held_out = np.concatenate([h for _, h in folds])
    assert sorted(held_out.tolist()) == list(range(len(labels)))  # every image held out once: no image in two folds
    for fit, out in folds:
        assert not set(fit) & set(out) and len(fit) + len(out) == len(labels)
        # each class is split evenly: a fold holds a fifth of it, give or take one image
        np.testing.assert_allclose(np.bincount(labels[out], minlength=6), np.bincount(labels) / 5, atol=1)
    again = features.fold_indices(labels, 5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))  # seeded
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, features.fold_indices(labels, 5, seed=4)))
    with pytest.raises(ValueError, match="trainer.cv_folds=11 needs at least 11 images of every class"):
        features.fold_indices(labels, 11, seed=0)


def test_a_fold_fits_on_the_other_folds_in_every_view_and_holds_out_its_own_images():
    rng = np.random.default_rng(0)
    labels = {"train": np.repeat(np.arange(3), 4), "validation": np.repeat(np.arange(3), 2)}
    arrays = {(split, v): rng.normal(size=(len(labels[split]), 2)) for split in labels for v in ("identity", "flip")}
    cached = features.Features(arrays, labels, (2,))
    folds = cached.folds(3, seed=0, views=("identity", "flip"))
    pooled = np.concatenate([arrays["train", "identity"], arrays["validation", "identity"]])
    for fold in folds:
        held_out, _ = fold.get("validation")
        fit, fit_labels = fold.stack(("train",), ("identity", "flip"))
        assert len(held_out) == 6 and len(fit) == 2 * 12
        assert not {tuple(r) for r in held_out} & {tuple(r) for r in fit}
        assert {tuple(r) for r in held_out} <= {tuple(r) for r in pooled}
        assert np.bincount(fold.labels["validation"]).tolist() == [2, 2, 2]


def test_a_head_trained_on_cached_features_matches_end_to_end_training(synthetic_cfg, tmp_path):
    overrides = {"epochs": 4, "lr": 0.02, "model": {"augmentation": {"enabled": False}}}
    results = {}
    for cached in (True, False):
        cfg = synthetic_cfg.copy()
        cfg.merge_with({**overrides, "trainer": {"feature_cache": cached}})
        results[cached] = run_job(cfg, tmp_path / f"cached={cached}")
    assert results[True]["val/accuracy_best"] == pytest.approx(results[False]["val/accuracy_best"], abs=0.005)
    assert results[True]["test/accuracy"] == pytest.approx(results[False]["test/accuracy"], abs=0.02)
    assert results[True]["val/accuracy_best"] > 0.5  # learned something: chance is 0.25
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.tags["feature_cache"] for r in runs) == ["false", "true"]
    assert all(("time/features_s" in r.data.metrics) == (r.data.tags["feature_cache"] == "true") for r in runs)
