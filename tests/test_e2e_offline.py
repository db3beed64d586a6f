"""End to end on the real offline data and backbone, on slices of the splits to stay fast."""

import mlflow
import numpy as np
import pandas as pd
import pytest

from src.data import load_splits
from tests.conftest import TEST_HEAD, compose_config
from tests.helpers import logged_runs as runs, train_cli as train

SLICES = {"train": "train[:50%]", "validation": "validation[:30%]", "test": "test[:300]"}


@pytest.mark.e2e
def test_mobilenet_v2_on_oxford_flowers102_slices(offline_data_dir, offline_backbones_dir, tmp_path):
    overrides = [*TEST_HEAD, "backbone=mobilenet_v2_100_224", f"data.data_dir={offline_data_dir}", "epochs=3", "lr=0.01",
                 "trainer.verbose=2", *(f'data.splits.{split}="{s}"' for split, s in SLICES.items())]
    result = train(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs(tmp_path)
    metrics = run.data.metrics
    assert run.data.tags["dataset"] == "oxford_flowers102" and run.data.tags["dataset_version"] == "2.1.1"
    assert metrics["test/accuracy"] > 0.3, metrics  # 102 classes: chance is 0.01
    assert metrics["test/top5_accuracy"] > metrics["test/accuracy"]

    splits = load_splits(compose_config(*overrides).data)
    jpegs, labels = zip(*[(image.numpy(), int(label)) for image, label in splits.test])
    predicted = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(pd.DataFrame({"image": jpegs}))
    assert float((predicted["label"].to_numpy() == np.array(labels)).mean()) == pytest.approx(
        metrics["test/accuracy"])
    assert predicted["class_name"].iloc[0] == splits.class_names[predicted["label"].iloc[0]]
    assert len(predicted["top_k"].iloc[0]) == 5
