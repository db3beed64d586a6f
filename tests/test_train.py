import keras
import numpy as np
import pytest

from src.backbone import HubFeatureVector
from src.config import UserError
from src.data import load_splits, make_batches
from src.model import build_model
from src.train import compile_model, fit, make_loss, make_optimizer, one_hot
from tests.conftest import compose_config


@pytest.fixture
def job(synthetic_cfg, tiny_backbone):
    splits = load_splits(synthetic_cfg.data)
    train = make_batches(splits.train, (32, 32), 16, cache=True, shuffle_seed=0)
    validation = make_batches(splits.validation, (32, 32), 16, cache=True)
    return splits, train, validation


def test_fit_learns_the_synthetic_classes_and_restores_the_best_epoch(job, synthetic_cfg, tiny_backbone):
    splits, train, validation = job
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"lr": 0.05, "epochs": 8, "model": {"augmentation": {"enabled": False}}})
    keras.utils.set_random_seed(0)
    model = build_model(HubFeatureVector(tiny_backbone), (32, 32), 4, cfg.model, seed=0)
    compile_model(model, cfg)
    history = fit(model, train, validation, 4, cfg)
    best = max(history.history["val_accuracy"])
    assert best >= 0.8, history.history["val_accuracy"]  # chance is 0.25
    _, restored = model.evaluate(one_hot(validation, 4), verbose=0)
    assert restored == pytest.approx(best, abs=1e-6)


def test_early_stopping_stops_after_patience_epochs_without_improvement(job, synthetic_cfg, tiny_backbone):
    splits, train, validation = job
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"lr": 1e-9, "epochs": 10, "trainer": {"early_stopping": {"patience": 1}}})
    model = build_model(HubFeatureVector(tiny_backbone), (32, 32), 4, cfg.model, seed=0)
    compile_model(model, cfg)
    history = fit(model, train, validation, 4, cfg)
    assert len(history.history["val_accuracy"]) == 2


def test_optimizer_and_loss_follow_the_config():
    cfg = compose_config("lr=0.02", "trainer.optimizer.name=sgd", "+trainer.optimizer.momentum=0.9",
                         "model.label_smoothing=0.2")
    optimizer = make_optimizer(cfg)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert float(optimizer.learning_rate) == pytest.approx(0.02) and optimizer.momentum == 0.9
    assert make_loss(cfg).get_config()["label_smoothing"] == 0.2
    smoothed = float(make_loss(cfg)(np.eye(4)[[0]], np.eye(4)[[0]] * 0.999 + 0.00025))
    assert smoothed > float(keras.losses.CategoricalCrossentropy()(np.eye(4)[[0]], np.eye(4)[[0]] * 0.999 + 0.00025))


def test_an_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="trainer.optimizer='adamw2' .* is not a Keras optimizer"):
        make_optimizer(compose_config("trainer.optimizer.name=adamw2"))
