import shutil

import mlflow
import numpy as np
import pytest
import tensorflow as tf

from src import features
from src.backbone import HubFeatureVector
from src.model import build_feature_extractor
from src.pipeline import run_job
from tests.conftest import compose_config

KEY_ARGS = dict(input_size=(224, 224), dataset="oxford_flowers102", version="2.1.1", split="train")


def test_the_cache_applies_only_to_a_frozen_backbone_without_augmentation():
    assert features.applies(compose_config("model.augmentation.enabled=false"))
    assert not features.applies(compose_config())
    assert not features.applies(compose_config("model.augmentation.enabled=false", "backbone.trainable=true"))
    assert not features.applies(compose_config("model.augmentation.enabled=false", "trainer.feature_cache=false"))


def key(path, **changes):
    return features.cache_key(str(path), features.files_digest(str(path)), **{**KEY_ARGS, **changes})


def test_the_key_changes_with_everything_that_changes_the_features(tiny_backbone, tmp_path, monkeypatch):
    original = key(tiny_backbone)
    assert key(tiny_backbone) == original
    for change in [dict(input_size=(260, 260)), dict(dataset="image_folder:mine"), dict(version="2.1.2"),
                   dict(split="train[:50%]")]:
        assert key(tiny_backbone, **change) != original, change

    copy = shutil.copytree(tiny_backbone, tmp_path / "copy")
    assert key(copy) != original  # another handle
    moved = key(copy)
    weights = copy / "variables" / "variables.data-00000-of-00001"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert key(copy) != moved  # same handle, other weights

    monkeypatch.setattr(features, "PREPROCESSING", features.PREPROCESSING + "+center_crop")
    assert key(tiny_backbone) != original
    monkeypatch.setattr(features.tf, "__version__", "9.9.9")
    assert key(tiny_backbone) != original


def test_features_are_computed_once_then_read_back(tiny_backbone, tmp_path):
    extractor = build_feature_extractor(HubFeatureVector(tiny_backbone), (32, 32))
    images = np.random.default_rng(0).integers(0, 256, (10, 40, 40, 3), dtype=np.uint8)
    batches = tf.data.Dataset.from_tensor_slices((images, np.arange(10))).batch(4)
    path = tmp_path / "features" / "key.npz"
    computed, labels = features.load_or_extract(extractor, batches, path)
    assert computed.shape == (10, 16) and labels.tolist() == list(range(10))
    np.testing.assert_allclose(computed, extractor.predict(images, verbose=0), rtol=1e-5)
    assert [p.name for p in path.parent.iterdir()] == ["key.npz"]  # no partial file left behind
    cached, cached_labels = features.load_or_extract(None, None, path)  # read: neither is touched
    np.testing.assert_array_equal(cached, computed)
    np.testing.assert_array_equal(cached_labels, labels)


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

    cache_files = sorted((tmp_path / "cache" / "features").iterdir())
    assert len(cache_files) == 3  # train, validation, test
    mtimes = [p.stat().st_mtime_ns for p in cache_files]
    cfg = synthetic_cfg.copy()
    cfg.merge_with({**overrides, "lr": 0.01})  # another job, same features: reused, not rewritten
    run_job(cfg, tmp_path / "again")
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache" / "features").iterdir())] == mtimes
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.tags["feature_cache"] for r in runs) == ["false", "true", "true"]
    assert all(("time/features_s" in r.data.metrics) == (r.data.tags["feature_cache"] == "true") for r in runs)
