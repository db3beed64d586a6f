import keras
import numpy as np
import pytest
import tensorflow as tf

from src.evaluate import evaluation
from src.model import predict_batches


def constant_model(probabilities):
    """A model that ignores its image and always answers `probabilities`."""
    images = keras.Input((None, None, 3), dtype="uint8")
    zeros = keras.layers.Lambda(lambda x: tf.zeros((tf.shape(x)[0], 1)))(images)
    dense = keras.layers.Dense(len(probabilities), activation="softmax")
    model = keras.Model(images, dense(zeros))
    dense.set_weights([np.zeros((1, len(probabilities))), np.log(probabilities)])
    return model


def batches(labels, batch_size=4):
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    return tf.data.Dataset.from_tensor_slices((images, np.array(labels, np.int64))).batch(batch_size)


def test_metrics_per_class_accuracy_and_confusion_matrix():
    # Always predicts class 0, then 1, 2, 3, 4, 5 in decreasing order of score.
    scores = np.array([0.4, 0.2, 0.15, 0.1, 0.08, 0.07])
    labels = [0, 0, 0, 1, 2, 5, 5, 3, 4, 0]
    result = evaluation(*predict_batches(constant_model(scores), batches(labels)), list("abcdef"),
                      keras.losses.CategoricalCrossentropy())
    assert result.metrics["test/accuracy"] == pytest.approx(4 / 10)
    assert result.metrics["test/top5_accuracy"] == pytest.approx(8 / 10)  # class 5 is sixth
    expected_loss = -np.mean(np.log(scores[labels]))
    assert result.metrics["test/loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result.metrics["test/nll"] == pytest.approx(expected_loss, rel=1e-6)
    smoothed = evaluation(*predict_batches(constant_model(scores), batches(labels)), list("abcdef"),
                          keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    assert smoothed.metrics["test/loss"] != pytest.approx(expected_loss, rel=1e-3)  # smoothed targets weigh every class
    assert smoothed.metrics["test/nll"] == result.metrics["test/nll"]
    assert result.confusion[:, 0].tolist() == [4, 1, 1, 1, 1, 2] and result.confusion.sum() == 10
    assert result.per_class["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert result.per_class["images"].tolist() == [4, 1, 1, 1, 1, 2]
    assert result.metrics["test/mean_class_accuracy"] == pytest.approx(1 / 6)  # class a right, the five others not
    assert result.metrics["test/accuracy_ci_low"] <= 0.4 <= result.metrics["test/accuracy_ci_high"]


def test_a_class_without_test_images_has_no_accuracy_rather_than_zero():
    result = evaluation(*predict_batches(constant_model(np.array([0.6, 0.3, 0.1])), batches([0, 1])), list("abc"),
                      keras.losses.CategoricalCrossentropy())
    assert set(result.metrics) == {"test/accuracy", "test/accuracy_ci_low", "test/accuracy_ci_high",
                                   "test/mean_class_accuracy", "test/mean_class_accuracy_ci_low",
                                   "test/mean_class_accuracy_ci_high", "test/top5_accuracy", "test/loss",
                                   "test/nll"}
    assert result.metrics["test/mean_class_accuracy"] == 0.5  # a right, b wrong; c has no image and is left out
    assert np.isnan(result.per_class["accuracy"][2])
