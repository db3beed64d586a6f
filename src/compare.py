"""Paired comparisons of runs on the same images, from the per-image predictions each run logged.

A training run logs `test_predictions.csv` and `validation_predictions.csv`: each image of the split by its index,
with its label, the model's top-1 (with the run's test-time views) and, when those are several, its one-view top-1.
Validation's are the selected model's, before any refit (which trains on validation).
Two runs compare only if they saw the same images: the same dataset, version and split, and the same labels in
the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from src import stats
from src.config import UserError

SPLIT_TAGS = {"test": "test_split", "validation": "validation_split"}


@dataclass(frozen=True)
class Predictions:
    run_id: str
    split: str
    dataset: str  # dataset, version and split, e.g. oxford_flowers102 2.1.1 test
    frame: pd.DataFrame  # label, predicted[, predicted_single_view], by image index

    def correct(self, one_view: bool = False) -> np.ndarray:
        column = "predicted_single_view" if one_view and "predicted_single_view" in self.frame else "predicted"
        if column not in self.frame:
            raise UserError(f"run {self.run_id} logged its {self.split} predictions with one view only, before they "
                            "held its test-time views; compare with --one-view")
        return (self.frame[column] == self.frame["label"]).to_numpy()


def load_predictions(run_id: str, split: str = "test") -> Predictions:
    if split not in SPLIT_TAGS:
        raise UserError(f"split {split!r} is unknown; use test or validation")
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id} in {mlflow.get_tracking_uri()}; check the run id in the MLflow UI") from None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{split}_predictions.csv")
    except (MlflowException, OSError):
        raise UserError(f"run {run_id} ({run.info.run_name}) logged no {split}_predictions.csv; compare runs "
                        "trained by this version of the project") from None
    tags = run.data.tags
    dataset = " ".join(tags.get(key, "?") for key in ("dataset", "dataset_version", SPLIT_TAGS[split]))
    frame = pd.read_csv(path, index_col="index")
    if split == "validation" and "val/accuracy_tta" in run.data.metrics and "predicted_single_view" not in frame:
        # logged before validation's file held the served top-1: its one column is the one-view top-1
        frame = frame.rename(columns={"predicted": "predicted_single_view"})
    return Predictions(run_id, split, dataset, frame)


def check_same_images(a: Predictions, b: Predictions) -> None:
    if a.dataset != b.dataset:
        raise UserError(f"runs {a.run_id} and {b.run_id} were evaluated on different images ({a.dataset} against "
                        f"{b.dataset}); compare runs of the same dataset, version and split")
    if len(a.frame) != len(b.frame) or not np.array_equal(a.frame["label"].to_numpy(), b.frame["label"].to_numpy()):
        raise UserError(f"runs {a.run_id} and {b.run_id} logged different labels for the {a.split} images "
                        f"({len(a.frame)} against {len(b.frame)} images); compare runs evaluated on the same images")


def compare_runs(run_a: str, run_b: str, split: str = "test", one_view: bool = False) -> stats.Paired:
    """Run B against run A on the same images: both accuracies, B - A with its paired-bootstrap interval, and
    McNemar's exact p-value. `one_view`: each run's one-view predictions, where it used test-time views."""
    a, b = load_predictions(run_a, split), load_predictions(run_b, split)
    check_same_images(a, b)
    return stats.paired_comparison(a.correct(one_view), b.correct(one_view))
