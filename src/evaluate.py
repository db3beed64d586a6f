"""Evaluation of predicted probabilities against labels: accuracy and mean per-class accuracy, each with a 95 %
interval (a seeded percentile bootstrap over the images, src/stats.py), top-5, loss (the training loss, label
smoothing included) and negative log-likelihood, per-class accuracy, the confusion matrix and every image's
prediction."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from src import stats


@dataclass
class Evaluation:
    metrics: dict[str, float]  # named <split>/<metric>, e.g. test/accuracy, test/accuracy_ci_low
    per_class: pd.DataFrame
    confusion: np.ndarray  # rows: true class, columns: predicted class
    predictions: pd.DataFrame  # one row per image, in the split's order: label, predicted, confidence


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The share of images whose most probable class is their label."""
    return float((probabilities.argmax(axis=1) == labels).mean())


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy of the labels, without label smoothing (so heads trained with and without it
    compare), in float64; probabilities clipped at Keras's epsilon."""
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.log(np.clip(picked, keras.config.epsilon(), 1.0)).mean())


def interval_metrics(correct: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """`prefix`accuracy and `prefix`mean_class_accuracy, each with its 95 % bootstrap interval."""
    low, high = stats.accuracy_interval(correct)
    class_low, class_high = stats.mean_class_interval(correct, labels)
    return {f"{prefix}accuracy": float(correct.mean()), f"{prefix}accuracy_ci_low": low,
            f"{prefix}accuracy_ci_high": high,
            f"{prefix}mean_class_accuracy": stats.mean_class_accuracy(correct, labels),
            f"{prefix}mean_class_accuracy_ci_low": class_low, f"{prefix}mean_class_accuracy_ci_high": class_high}


def evaluation(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], loss: keras.losses.Loss,
               split: str = "test") -> Evaluation:
    """The evaluation of predicted class `probabilities` [images, classes] against int `labels`."""
    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = pd.DataFrame({"label": np.arange(num_classes), "class_name": class_names,
                              "images": confusion.sum(axis=1), "correct": np.diag(confusion)})
    per_class["accuracy"] = per_class["correct"] / per_class["images"].where(per_class["images"] > 0)

    metrics = {**interval_metrics(predicted == labels, labels, f"{split}/"),
               f"{split}/top5_accuracy": float((top5 == labels[:, None]).any(axis=1).mean()),
               f"{split}/loss": float(loss(tf.one_hot(labels, num_classes), probabilities)),
               f"{split}/nll": negative_log_likelihood(probabilities, labels)}
    predictions = pd.DataFrame({"label": labels, "predicted": predicted,
                                "confidence": probabilities[np.arange(len(labels)), predicted]})
    predictions.index.name = "index"
    return Evaluation(metrics, per_class, confusion, predictions)
