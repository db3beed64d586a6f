"""Evaluation on the test split, once: accuracy, top-5, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf



@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_class: pd.DataFrame
    confusion: np.ndarray  # rows: true class, columns: predicted class
    predictions: pd.DataFrame  # one row per image, in the split's order: label, predicted, confidence


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The share of images whose most probable class is their label."""
    return float((probabilities.argmax(axis=1) == labels).mean())


def evaluation(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str],
               loss: keras.losses.Loss) -> Evaluation:
    """The evaluation of predicted class `probabilities` [images, classes] against int `labels`."""
    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    loss_value = float(loss(tf.one_hot(labels, num_classes), probabilities))

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = pd.DataFrame({"label": np.arange(num_classes), "class_name": class_names,
                              "images": confusion.sum(axis=1), "correct": np.diag(confusion)})
    per_class["accuracy"] = per_class["correct"] / per_class["images"].where(per_class["images"] > 0)

    metrics = {"test/accuracy": accuracy(probabilities, labels),
               "test/top5_accuracy": float((top5 == labels[:, None]).any(axis=1).mean()),
               "test/loss": loss_value}
    predictions = pd.DataFrame({"label": labels, "predicted": predicted,
                                "confidence": probabilities[np.arange(len(labels)), predicted]})
    predictions.index.name = "index"
    return Evaluation(metrics, per_class, confusion, predictions)
