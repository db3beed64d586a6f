"""Beyond the frozen linear head: several backbones, test-time augmentation, training views, refit on
train + validation, and fine-tuning in two stages; on synthetic data and tiny backbones."""

from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from src.config import UserError
from src.data import load_splits, make_batches
from src.export import CLASSIFY_RESIZED
from src.features import Features
from src.pipeline import _selection_metrics, run_job
from src.spec import Job
from src.stages import Context, HeldOutScores, Plan, SelectionValidation, _curves
from src.views import predict_views, view
from tests.conftest import compose_config
from tests.tiny_backbone import save_tiny_backbone


def two_backbones(handle: str, other_handle: str | None = None) -> list[dict]:
    """Two tiny backbones that see the image at different sizes."""
    return [{"name": "small", "handle": handle, "input_size": [32, 32]},
            {"name": "large", "handle": other_handle or handle, "input_size": [48, 48]}]


@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory) -> str:
    """Another tiny backbone: 24 features, other weights."""
    return save_tiny_backbone(str(tmp_path_factory.mktemp("backbones") / "wide"), features=24, seed=1)


def job(synthetic_cfg, **changes):
    """A fast linear probe on the synthetic data, with `changes` merged in."""
    cfg = synthetic_cfg.copy()
    cfg.merge_with({"epochs": 4, "lr": 0.02, "model": {"augmentation": {"enabled": False}, "normalize_features": True}})
    cfg.merge_with(changes)
    return cfg


def logged_run():
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return run


def served_top1(run_id: str, n: int = 8):
    """The exported model's top-1 for the first test images, through MLflow's pyfunc model (raw image bytes)."""
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = [image.numpy() for image, _ in load_splits(compose_config("data=synthetic").data).test.take(n)]
    return model.predict(pd.DataFrame({"image": images}))


def logged_predictions(run_id: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv"))


def test_backbones_name_options_or_give_mappings_and_the_model_input_is_the_largest(tiny_backbone):
    spec = Job.from_config(compose_config("backbones=[mobilenet_v1_100_224,efficientnet_lite2_260]"))
    assert [b.name for b in spec.backbones] == ["mobilenet_v1_100_224", "efficientnet_lite2_260"]
    assert spec.backbones[0].handle.endswith("/mobilenet_v1_100_224")  # ${paths.backbones_dir} resolved
    assert spec.input_size == (260, 260)
    spec = Job.from_config(job(compose_config(), backbones=two_backbones(tiny_backbone)))
    assert [(b.name, b.trainable) for b in spec.backbones] == [("small", False), ("large", False)]
    assert Job.from_config(compose_config("backbone=efficientnet_lite2_260")).input_size == (260, 260)


@pytest.mark.parametrize("changes, message", [
    ({"backbones": ["mobilenet_v1_100_224", "resnet"]}, "unknown backbone 'resnet' in backbones; choose from: "),
    ({"backbones": ["mobilenet_v1_100_224"] * 2}, "backbones=['mobilenet_v1_100_224', 'mobilenet_v1_100_224'] names a backbone twice"),
    ({"backbones": [{"name": "x"}]}, "backbones entry {'name': 'x'} is invalid: give a conf/backbone name, or a"),
    ({"model": {"tta": "flips"}}, "model.tta='flips' is unknown; use one of: none, flip, crops"),
    ({"model": {"train_views": "mirror"}}, "model.train_views='mirror' is unknown; use one of: none, flip, crops"),
    ({"finetune": {"lr_scale": 0}}, "finetune.lr_scale=0 is invalid: expected a positive number"),
    ({"trainer": {"refit": "yes"}}, "trainer.refit='yes' is invalid: expected true or false"),
])
def test_bad_technique_settings_are_one_line_errors_before_any_run(synthetic_cfg, tmp_path, changes, message):
    with pytest.raises(UserError) as error:
        run_job(job(synthetic_cfg, **changes), tmp_path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_views_are_fixed_transforms_of_the_batch():
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3)), tf.uint8)
    np.testing.assert_array_equal(view(images, "identity"), images)
    np.testing.assert_array_equal(view(images, "flip"), images.numpy()[:, :, ::-1])
    center = view(images, "center")
    crop = tf.cast(images[:, 4:36, 5:45], tf.float32)  # the central 80 %: 32 of 40 rows, 40 of 50 columns
    expected = tf.image.resize(crop, (40, 50), method="bilinear", antialias=True)
    np.testing.assert_array_equal(center, tf.cast(tf.clip_by_value(tf.round(expected), 0, 255), tf.uint8))
    np.testing.assert_array_equal(view(images, "center_flip"), center.numpy()[:, :, ::-1])
    constant = lambda x, training=False: tf.cast(tf.reduce_mean(x, axis=[1, 2, 3])[:, None], tf.float32)
    expected = np.mean([constant(images), constant(view(images, "center"))], axis=0)
    np.testing.assert_allclose(predict_views(constant, images, ("identity", "center")), expected, rtol=1e-6)


def test_two_backbones_with_tta_training_views_and_refit_in_one_run(synthetic_cfg, tiny_backbone, wide_backbone,
                                                                   tmp_path):
    cfg = job(synthetic_cfg, backbones=two_backbones(tiny_backbone, wide_backbone),
              model={"tta": "flip", "train_views": "flip"}, trainer={"refit": True})
    metrics = run_job(cfg, tmp_path / "job")
    run = logged_run()
    assert run.data.tags["backbone"] == "small+large"
    assert run.info.run_name == "small+large-tta_flip-views_flip-refit-lr0.02-bs32-seed42"
    assert metrics["test/accuracy"] > 0.5 and metrics["val/accuracy_tta"] > 0.5  # chance is 0.25
    assert "test/accuracy_single_view" in metrics

    client = mlflow.MlflowClient()
    val_curve = client.get_metric_history(run.info.run_id, "val/accuracy")
    refit_curve = client.get_metric_history(run.info.run_id, "refit/train/accuracy")
    assert len(val_curve) == metrics["epochs_trained"]
    assert [m.step for m in refit_curve] == list(range(1, int(metrics["best_epoch"]) + 1))  # the selected epochs
    assert not client.get_metric_history(run.info.run_id, "refit/val/accuracy")  # validation is training data

    # per backbone, split and view: 2 x 3 x 2 files
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 12
    # the served model averages over the image and its mirror, as the evaluation did
    served, logged = served_top1(run.info.run_id), logged_predictions(run.info.run_id)
    assert list(served["label"]) == list(logged["predicted"][:8])
    np.testing.assert_allclose(served["score"], logged["confidence"][:8], atol=1e-4)
    # TFLite's signature: each backbone's images at its own size, one view, each backbone's features in the head's
    # order (16 + 24 of them): over the image and its mirror it gives the logged TTA answers
    saved_model = tf.saved_model.load(str(next((tmp_path / "job" / "saved_model").rglob("saved_model.pb")).parent))
    sizes = {"images_32x32": (32, 32), "images_48x48": (48, 48)}
    images, _ = next(iter(make_batches(load_splits(cfg.data).test, sizes, 80)))
    classify = saved_model.signatures[CLASSIFY_RESIZED]
    resized = classify(**images)["probabilities"].numpy()
    assert resized.shape == (80, 4)
    mirrored = classify(**{name: batch[:, :, ::-1] for name, batch in images.items()})["probabilities"].numpy()
    tta = (resized + mirrored) / 2
    np.testing.assert_array_equal(tta.argmax(axis=1), logged["predicted"].to_numpy())
    np.testing.assert_allclose(tta.max(axis=1), logged["confidence"], atol=1e-4)


@pytest.mark.parametrize("head", ["default", "logistic_regression"])
def test_select_on_served_selects_the_epoch_or_c_on_validation_through_the_test_time_views(synthetic_cfg, tmp_path,
                                                                                         head):
    """The served model averages its views' probabilities; selection on one view could not tell a TTA run from
    the same run without TTA."""
    cfg = job(synthetic_cfg, epochs=5, model={"tta": "flip"}, trainer={"select_on": "served"})
    if head == "logistic_regression":
        cfg.model = compose_config("model=logistic_regression", "model.c_grid=[0.01,1,100]", "model.tta=flip").model
    metrics = run_job(cfg, tmp_path / "job")
    run = logged_run()
    assert run.data.tags["selection.metric"] == "val/served_accuracy_best"
    assert ("best_C" in metrics) == (head == "logistic_regression")
    assert metrics["selection/score"] == metrics["val/served_accuracy_best"]
    assert metrics["val/served_accuracy_best"] == pytest.approx(metrics["val/accuracy_tta"])  # the selected model's
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="validation_predictions.csv"))
    assert (predictions["predicted"] == predictions["label"]).mean() == pytest.approx(metrics["val/accuracy_tta"])
    assert (predictions["predicted_single_view"] == predictions["label"]).mean() == pytest.approx(
        metrics["val/accuracy_best"])
    if head == "default":
        history = {m.step: m.value for m in
                   mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/served_accuracy")}
        assert len(history) == metrics["epochs_trained"]
        assert metrics["best_epoch"] == max(history, key=lambda step: (history[step], -step))


def test_served_selection_scores_the_mean_of_the_views_probabilities():
    """Two images of classes 0 and 1; one view gets image 1 wrong, the mean with its mirror gets it right."""
    head = keras.Sequential([keras.Input((2,)), keras.layers.Activation("softmax")])
    features = Features({("validation", "identity"): np.array([[1.0, 0.0], [1.0, 0.0]]),
                         ("validation", "flip"): np.array([[1.0, 0.0], [0.0, 5.0]])},
                        {"validation": np.array([0, 1])}, (2,))
    logs = {"val_accuracy": 0.5}
    job = SimpleNamespace(select_on="served", tta=("identity", "flip"))
    SelectionValidation(head, features, job).on_epoch_end(0, logs)
    assert logs["val_served_accuracy"] == logs["val_selection"] == 1.0


def test_held_out_scores_are_right_answers_over_images_and_the_nll_without_smoothing():
    """Three images, the first two right: 2/3 in float64 (Keras's float32 is another float), and the NLL of the
    labels' probabilities, whatever loss the head trained with."""
    head = keras.Sequential([keras.Input((3,)), keras.layers.Activation("softmax")])
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1]]))
    logs = {"val_accuracy": float(np.float32(2 / 3)), "val_loss": 9.0}
    HeldOutScores(head, logits, np.array([0, 1, 1])).on_epoch_end(0, logs)
    assert float(np.float32(2 / 3)) != 2 / 3 and logs["val_accuracy"] == 2 / 3
    assert logs["val_nll"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.4])), rel=1e-6)


def test_curves_through_the_images_hold_right_answers_over_images_whatever_the_float_keras_logged():
    """Keras's float32 47/51 is above the float64 47/51 of a cached head or a logistic regression: a fine-tuning
    stage that only ties its first stage would beat it, and the selected accuracy would not tie either."""
    logged = [float(np.float32(40 / 51)), float(np.float32(47 / 51))]
    assert logged[1] > 47 / 51
    curves = _curves(SimpleNamespace(history={"val_accuracy": logged, "val_loss": [0.5, 0.3]}), 3, 51)
    assert list(curves["val/accuracy"]) == [40 / 51, 47 / 51] and list(curves.index) == [4, 5]
    metrics = _selection_metrics(curves, "clean")
    assert metrics["val/accuracy_best"] == 47 / 51 and metrics["best_epoch"] == 5


@pytest.mark.parametrize("folds, refit_epochs", [(None, 5), (4, 6)])
def test_a_refit_by_steps_runs_about_as_many_steps_as_the_selection(synthetic_cfg, folds, refit_epochs):
    """8 epochs selected in batches of 8: 5 steps an epoch on the 40 train images, or 6 on a CV fold's 3/4 of
    train + validation's 60; an epoch of the refit on all 60 is 8 steps."""
    cfg = job(synthetic_cfg, batch_size=8, trainer={"refit": True, "refit_budget": "steps", "cv_folds": folds})
    spec = Job.from_config(cfg)
    assert Plan(spec)._matched_epochs(Context(spec, load_splits(cfg.data), None, None), 8) == refit_epochs


def test_a_cross_validated_run_is_selected_on_its_folds_and_refits_for_their_epochs(synthetic_cfg, tmp_path):
    cfg = job(synthetic_cfg, batch_size=8, epochs=6, trainer={"refit": True, "refit_budget": "steps", "cv_folds": 4})
    run_job(cfg, tmp_path / "job")
    run = logged_run()
    metrics = run.data.metrics
    assert run.data.tags["selection.metric"] == "cv/accuracy"
    assert metrics["selection/score"] == metrics["cv/accuracy"] == pytest.approx(
        np.mean([metrics[f"cv/fold{i}/accuracy"] for i in range(1, 5)]))
    assert metrics["cv/accuracy_ci_low"] <= metrics["cv/accuracy"] <= metrics["cv/accuracy_ci_high"]
    assert metrics["refit/stage1_epochs"] == max(1, round(metrics["cv/epochs"] * 6 / 8))


@pytest.mark.parametrize("head", ["default", "logistic_regression"])
def test_cross_validation_scores_both_heads_folds_alike(synthetic_cfg, tmp_path, head):
    """The CV loss is the folds' NLL at the selected budget, not the label-smoothed loss a dense head trains on
    (smoothing 0.5 here), so the two heads' runs compare; a logistic regression's loss already is its NLL. (Each
    fold's accuracy as right answers / images in float64 is test_held_out_scores_...'s: the synthetic folds score
    1.0, a float either way.)"""
    cfg = job(synthetic_cfg, batch_size=8, trainer={"cv_folds": 4}, model={"label_smoothing": 0.5})
    if head == "logistic_regression":
        cfg.model = compose_config("model=logistic_regression").model
    metrics = run_job(cfg, tmp_path / "job")
    assert metrics["cv/accuracy"] == np.mean([metrics[f"cv/fold{i}/accuracy"] for i in range(1, 5)])
    client, run_id = mlflow.MlflowClient(), logged_run().info.run_id
    loss, nll = ({m.step: m.value for m in client.get_metric_history(run_id, f"cv/curve/{name}")}
                 for name in ("val_loss", "val_nll"))
    # the curves' steps are the epochs, or the grid's values in order
    step = metrics["cv/epochs"] if head == "default" else sorted(cfg.model.c_grid).index(metrics["cv/C"]) + 1
    assert metrics["cv/loss"] == nll[step]
    if head == "default":  # the smoothed loss the folds trained on is far above their NLL
        assert loss[step] > nll[step] + 0.1
    else:
        assert loss[step] == nll[step]


def test_two_backbones_on_cached_features_match_training_through_the_images(synthetic_cfg, tiny_backbone, tmp_path):
    """The cache keys each backbone's features by the size images are decoded to, as the model sees them."""
    results = {}
    for cached in (True, False):
        cfg = job(synthetic_cfg, backbones=two_backbones(tiny_backbone), trainer={"feature_cache": cached})
        results[cached] = run_job(cfg, tmp_path / f"cached={cached}")
    assert results[True]["val/accuracy_best"] == pytest.approx(results[False]["val/accuracy_best"], abs=0.005)
    assert results[True]["test/accuracy"] == pytest.approx(results[False]["test/accuracy"], abs=0.01)


def backbone_kernel(saved_model_dir) -> np.ndarray:
    [kernel] = [v.numpy() for v in tf.saved_model.load(str(saved_model_dir)).variables if "conv" in v.name]
    return kernel


@pytest.mark.parametrize("stage1_lr, selected, refit", [(1e-4, "fine-tuned", False), (0.05, "frozen", False),
                                                        (1e-4, "fine-tuned", True)])
def test_finetuning_continues_the_run_and_keeps_the_better_stage(synthetic_cfg, tiny_backbone, tmp_path, stage1_lr,
                                                                 selected, refit):
    """Stage 1 at a tiny lr learns little in two epochs, so stage 2 (lr 0.02, backbone unfrozen) is selected; a
    stage 1 that already separates the classes is kept, backbone untouched. A refit repeats both stages."""
    cfg = job(synthetic_cfg, epochs=2, lr=stage1_lr, trainer={"refit": refit},
              finetune={"enabled": True, "lr_scale": 0.02 / stage1_lr, "epochs": 3, "patience": 3})
    metrics = run_job(cfg, tmp_path / "job")
    run = logged_run()
    client = mlflow.MlflowClient()
    first = int(client.get_metric_history(run.info.run_id, "finetune/first_epoch")[0].value)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
    assert steps == list(range(1, first + 3)) and first == 3  # stage 1: epochs 1-2; stage 2: 3-5, one run
    assert run.data.tags["feature_cache"] == "true"  # stage 1 trained on cached features
    pretrained = backbone_kernel(tiny_backbone)
    kernel = backbone_kernel(next((tmp_path / "job" / "saved_model").rglob("saved_model.pb")).parent)
    if selected == "fine-tuned":
        assert metrics["best_epoch"] >= first and not np.allclose(kernel, pretrained)
    else:
        assert metrics["best_epoch"] < first and np.array_equal(kernel, pretrained)
    served, logged = served_top1(run.info.run_id), logged_predictions(run.info.run_id)
    assert list(served["label"]) == list(logged["predicted"][:8])
    refit_steps = [m.step for m in client.get_metric_history(run.info.run_id, "refit/train/accuracy")]
    if refit:  # each stage for its selected epochs: stage 1 up to its best epoch, stage 2 up to its own
        stage1 = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/accuracy"),
                                          key=lambda m: m.step) if m.step < first]
        stage1_best, stage2_best = int(np.argmax(stage1)) + 1, int(metrics["best_epoch"]) - (first - 1)
        assert refit_steps == list(range(1, stage1_best + stage2_best + 1))
    else:
        assert not refit_steps
