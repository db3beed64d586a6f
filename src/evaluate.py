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
    confusion: np.ndarray          # rows: true class, columns: predicted class
    sample_images: np.ndarray      # the first few test images, for a predictions grid
    sample_labels: np.ndarray
    sample_probabilities: np.ndarray


def evaluate(model: keras.Model, batches: tf.data.Dataset, class_names: list[str], loss: keras.losses.Loss,
             num_samples: int = 16, prefix: str = "test") -> Evaluation:
    """One pass over `batches` of (uint8 images, int labels)."""
    probabilities, labels, samples = [], [], []
    for images, batch_labels in batches:
        probabilities.append(model.predict_on_batch(images))
        labels.append(batch_labels.numpy())
        if sum(len(s) for s in samples) < num_samples:
            samples.append(images.numpy())
    probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    loss_value = float(loss(tf.one_hot(labels, num_classes), probabilities))

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = pd.DataFrame({"label": np.arange(num_classes), "class_name": class_names,
                              "images": confusion.sum(axis=1), "correct": np.diag(confusion)})
    per_class["accuracy"] = per_class["correct"] / per_class["images"].where(per_class["images"] > 0)

    metrics = {f"{prefix}/accuracy": float((predicted == labels).mean()),
               f"{prefix}/top5_accuracy": float((top5 == labels[:, None]).any(axis=1).mean()),
               f"{prefix}/loss": loss_value}
    sample_images = np.concatenate(samples)[:num_samples]
    return Evaluation(metrics, per_class, confusion, sample_images, labels[:len(sample_images)],
                      probabilities[:len(sample_images)])
