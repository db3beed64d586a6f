import keras
import numpy as np
import pytest

from src.config import UserError
from src.data import load_splits, make_batches
from src.spec import Job
from src.train import Schedule, compile_model, fit, make_loss, one_hot
from tests.conftest import compose_config
from tests.helpers import tiny_classifier


@pytest.fixture
def batches(synthetic_cfg):
    splits = load_splits(synthetic_cfg.data)
    train = make_batches(splits.train, (32, 32), 16, cache=True, shuffle_seed=0)
    validation = make_batches(splits.validation, (32, 32), 16, cache=True)
    return train, validation


def test_fit_learns_the_synthetic_classes_and_restores_the_best_epoch(batches, tiny_backbone):
    train, validation = batches
    keras.utils.set_random_seed(0)
    model, _ = tiny_classifier(tiny_backbone, 4)
    compile_model(model, Job.from_config(compose_config()).optimizer, lr=0.05, label_smoothing=0.1)
    history = fit(model, train, validation, Schedule(8, patience=5), verbose=0)
    best = max(history.history["val_accuracy"])
    assert best >= 0.8, history.history["val_accuracy"]  # chance is 0.25
    _, restored = model.evaluate(one_hot(validation, 4), verbose=0)
    assert restored == pytest.approx(best, abs=1e-6)


def test_early_stopping_stops_after_patience_epochs_without_improvement(batches, tiny_backbone):
    train, validation = batches
    model, _ = tiny_classifier(tiny_backbone, 4)
    compile_model(model, Job.from_config(compose_config()).optimizer, lr=1e-9, label_smoothing=0.1)
    history = fit(model, train, validation, Schedule(10, patience=1), verbose=0)
    assert len(history.history["val_accuracy"]) == 2
    # without patience every epoch is trained, and still measured on validation
    history = fit(model, train, validation, Schedule(3), verbose=0)
    assert len(history.history["val_accuracy"]) == 3


def test_optimizer_and_loss_follow_the_config():
    job = Job.from_config(compose_config("lr=0.02", "trainer.optimizer.name=sgd", "+trainer.optimizer.momentum=0.9",
                                         "model.label_smoothing=0.2"))
    optimizer = job.optimizer.make(job.lr)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert float(optimizer.learning_rate) == pytest.approx(0.02) and optimizer.momentum == 0.9
    loss = make_loss(job.head.label_smoothing)
    assert loss.get_config()["label_smoothing"] == 0.2
    smoothed = float(loss(np.eye(4)[[0]], np.eye(4)[[0]] * 0.999 + 0.00025))
    assert smoothed > float(keras.losses.CategoricalCrossentropy()(np.eye(4)[[0]], np.eye(4)[[0]] * 0.999 + 0.00025))


def test_an_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="trainer.optimizer='adamw2' .* is not a Keras optimizer"):
        Job.from_config(compose_config("trainer.optimizer.name=adamw2"))
