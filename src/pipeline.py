"""One job, start to end, as one MLflow run: prepare -> train -> evaluate -> log -> export.

Fit on train, select on validation (or on k-fold cross-validation of train + validation), optionally refit on
train + validation, then evaluate test once, after every choice is made.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from src import features, plots, selection, shifts, spec, stats, track
from src.backbone import load_backbone
from src.data import Splits, load_splits, make_batches
from src.evaluate import Evaluation, evaluation
from src.export import export_saved_model, log_pyfunc_model, serving_cost
from src.model import Network
from src.spec import Job
from src.stages import SHIFTED_VALIDATION, Context, CrossValidation, Fitted, Plan, selection_column
from src.train import configure_cpu_devices, is_chief, make_loss, make_strategy, precision, profiler
from src.views import predict_views

log = logging.getLogger(__name__)

SHIFTED_TEST = "shifted_test"


@dataclass
class Inputs:
    splits: Splits
    network: Network
    strategy: tf.distribute.Strategy


def prepare(cfg: DictConfig) -> tuple[Job, Inputs]:
    """Everything that fails on bad input: the config's values, the devices, the dataset, the backbones."""
    job = Job.from_config(cfg)
    configure_cpu_devices(job.cpu_devices)  # before anything starts TensorFlow's devices
    strategy = make_strategy(job.strategy, job.tf_config)
    splits = load_splits(job.data)
    if job.selects_on_shifts or job.measure_shifts:
        splits = splits.with_sample(SHIFTED_VALIDATION, "validation", job.shift_per_class, shifts.SEED)
    if job.measure_shifts:
        splits = splits.with_sample(SHIFTED_TEST, "test", job.shift_per_class, shifts.SEED)
    with strategy.scope():  # the backbones' variables are the strategy's (mirrored) variables
        backbones = [load_backbone(b) for b in job.backbones]
    return job, Inputs(splits, Network(backbones, job.input_size), strategy)


def run_job(cfg: DictConfig, output_dir: Path, parent_run_id: str | None = None,
            callbacks: list[keras.callbacks.Callback] = ()) -> dict[str, float]:
    """Train, select, evaluate, log and export one model. Returns the run's final metrics.

    A single job checks its inputs before the MLflow run exists, so bad input leaves no trace. A job of a
    sweep (`parent_run_id`) starts its run first, so that a failure stays visible in the sweep as FAILED."""
    if parent_run_id is None:
        job, inputs = prepare(cfg)
        if not is_chief(inputs.strategy):
            return _run_unlogged(job, inputs, cfg, callbacks)
        track.setup(cfg.tracking)
        with track.job_run(job.run_name, cfg, None):
            return _run(job, inputs, output_dir, callbacks)
    track.setup(cfg.tracking)
    with track.job_run(spec.run_name(cfg), cfg, parent_run_id):
        return _run(*prepare(cfg), output_dir, callbacks)


def _run_unlogged(job: Job, inputs: Inputs, cfg: DictConfig, callbacks) -> dict[str, float]:
    """A multi-worker job on a worker other than the chief: every step the chief takes, since fit and evaluate
    hold collective ops that each worker must join (and so may saving the model), but logged to a throw-away
    MLflow store and exported to a throw-away folder (as MultiWorkerMirroredStrategy asks of workers that save),
    both deleted after."""
    with tempfile.TemporaryDirectory(prefix="worker-") as tmp:
        track.setup(OmegaConf.create({**cfg.tracking, "uri": f"sqlite:///{tmp}/mlflow.db",
                                      "artifact_location": f"{tmp}/artifacts"}))
        try:
            with track.job_run(job.run_name, cfg, None):
                return _run(job, inputs, Path(tmp) / "outputs", callbacks)
        finally:
            mlflow.set_tracking_uri(cfg.tracking.uri)


def _run(job: Job, inputs: Inputs, output_dir: Path, callbacks) -> dict[str, float]:
    with precision(job.mixed_precision):
        mlflow.set_tags(track.run_tags(job, inputs.splits, inputs.strategy))  # with the precision policy in effect
        trained = train(job, inputs, output_dir, callbacks)
        tested = test(job, inputs, trained.final)
        metrics = {**trained.metrics, **tested.metrics}
        mlflow.log_metrics(metrics)
        log_results(job, inputs, trained, tested, output_dir)
        metrics |= export(job, inputs, trained.final, output_dir)
    log.info("test accuracy %.4f [%.4f, %.4f] (top-5 %.4f); %s %.4f; train %.0f s", metrics["test/accuracy"],
             metrics["test/accuracy_ci_low"], metrics["test/accuracy_ci_high"], metrics["test/top5_accuracy"],
             selection.SCORE, metrics[selection.SCORE], metrics["time/train_s"])
    return metrics


@dataclass
class Trained:
    final: Fitted  # what is tested and exported: the selected model, or its refit
    curves: pd.DataFrame  # the selection's curves
    validation: Evaluation  # the selected model on validation, one view
    metrics: dict[str, float]  # selection's figures: val/*, cv/*, selection/*, time/*


def train(job: Job, inputs: Inputs, output_dir: Path, callbacks=()) -> Trained:
    """Select on validation (and cross-validation), evaluate the selected model on validation, then refit if asked."""
    start = time.perf_counter()
    metrics = {}
    cached = None
    if job.uses_feature_cache:
        views = {"train": job.train_views, "validation": {*job.tta, *(job.train_views if job.refit or job.cv_folds else ())},
                 "test": job.tta}
        if job.selects_on_shifts or job.measure_shifts:
            views[SHIFTED_VALIDATION] = shifted_views(job.tta if job.measure_shifts else ("identity",))
        if job.measure_shifts:
            views[SHIFTED_TEST] = shifted_views(job.tta)
        cached = features.load(inputs.network, inputs.splits, views, job.batch_size, job.cache_dir, job.seed)
        metrics["time/features_s"] = time.perf_counter() - start  # ~0 once the cache holds them
    ctx = Context(job, inputs.splits, inputs.network, inputs.strategy, cached)
    plan = Plan(job)
    callbacks = [track.EpochMetrics(), *callbacks, *([profiler(output_dir / "tensorboard")] if job.profile else [])]
    selected = plan.select(ctx, callbacks)
    # before a refit, which retrains layers that the selected model shares with it
    validation = _evaluate(job, inputs, selected, "validation")
    # val/accuracy and val/loss name the per-epoch curves: the selected epoch's are val/accuracy_best, val/loss_at_best
    metrics |= _selection_metrics(selected.curves, job.select_on) | {
        k: v for k, v in validation.metrics.items() if k not in ("val/accuracy", "val/loss")}
    if len(job.tta) > 1:  # validation_predictions.csv then holds both top-1s, as test_predictions.csv does
        served = _evaluate(job, inputs, selected, "validation", job.tta)
        metrics["val/accuracy_tta"] = served.metrics["val/accuracy"]
        served.predictions["predicted_single_view"] = validation.predictions["predicted"]
        validation = served
    if job.measure_shifts:
        metrics |= shifted_metrics(job, selected, SHIFTED_VALIDATION, "shifted/val/")
    cv = plan.cross_validate(ctx, job.cv_folds) if job.cv_folds else None
    if cv:
        metrics |= _cv_metrics(cv)
    name, score = selection.objective(metrics, job.select_on)
    metrics |= score
    mlflow.set_tag(selection.METRIC_TAG, name)
    final = plan.refit(ctx, (cv.budget,) if cv else selected.budgets) if job.refit else selected
    metrics["time/train_s"] = time.perf_counter() - start
    if job.profile:
        mlflow.log_artifacts(str(output_dir / "tensorboard"), "tensorboard")
    return Trained(final, selected.curves, validation, metrics)


def _selection_metrics(curves: pd.DataFrame, select_on: str) -> dict[str, float]:
    """The selected epoch (or grid value): the first with the best val accuracy (or selection value), in right
    answers / images whatever the head (the stages' curves hold it so)."""
    best = curves[selection_column(curves)].idxmax()
    metrics = {"val/accuracy_best": float(curves.loc[best, "val/accuracy"]),
               "val/loss_at_best": float(curves.loc[best, "val/loss"]), f"best_{curves.index.name}": best}
    if select_on == "served":
        metrics["val/served_accuracy_best"] = float(curves.loc[best, "val/served_accuracy"])
    elif select_on != "clean":
        shifted = float(curves.loc[best, "val/shifted_accuracy"])
        metrics |= {"val/shifted_accuracy_best": shifted, "val/mean_accuracy_best": (metrics["val/accuracy_best"] + shifted) / 2}
    if curves.index.name == "epoch":
        metrics["epochs_trained"] = len(curves)
    return metrics


def _cv_metrics(cv: CrossValidation) -> dict[str, float]:
    """The folds' accuracies at the selected budget, their mean, and a t interval over the folds."""
    mean, low, high = stats.t_interval(cv.fold_accuracies)
    metrics = {"cv/accuracy": cv.accuracy, "cv/loss": cv.loss, "cv/accuracy_ci_low": low, "cv/accuracy_ci_high": high,
               **{f"cv/fold{i}/accuracy": a for i, a in enumerate(cv.fold_accuracies, start=1)},
               **{f"cv/{key}": value for key, value in cv.budget.items()}}
    for step, (budget, row) in enumerate(cv.curve.iterrows(), start=1):
        mlflow.log_metrics({"cv/curve/val_accuracy": row["val/accuracy"], "cv/curve/val_loss": row["val/loss"],
                            "cv/curve/val_nll": row["val/nll"]},
                           step=int(budget) if cv.curve.index.name == "epoch" else step)
    return metrics


def _evaluate(job: Job, inputs: Inputs, fitted: Fitted, split: str, views=("identity",)) -> Evaluation:
    return evaluation(*fitted.predict(split, tuple(views)), inputs.splits.class_names,
                      make_loss(job.head.label_smoothing), split="val" if split == "validation" else split)


def test(job: Job, inputs: Inputs, final: Fitted) -> Evaluation:
    """The test split, once, with the job's test-time views; and with one view when there are several; and the
    shifted test sample, when asked."""
    start = time.perf_counter()
    tested = _evaluate(job, inputs, final, "test", job.tta)
    if len(job.tta) > 1:
        single = _evaluate(job, inputs, final, "test")
        tested.metrics |= {"test/accuracy_single_view": single.metrics["test/accuracy"]}
        tested.predictions["predicted_single_view"] = single.predictions["predicted"]
    if job.measure_shifts:
        tested.metrics |= shifted_metrics(job, final, SHIFTED_TEST, "shifted/test/")
    tested.metrics["time/eval_s"] = time.perf_counter() - start
    return tested


def shifted_view(condition: str, view: str) -> str:
    """The view name of a fixed view of a shifted photo, e.g. shift:blur:2+flip."""
    return f"shift:{condition}" + ("" if view == "identity" else f"+{view}")


def shifted_views(views: tuple[str, ...]) -> list[str]:
    """Every shift condition of src/shifts.py, each in each of `views`."""
    return [shifted_view(c, v) for c in shifts.CONDITIONS for v in views]


def shifted_metrics(job: Job, fitted: Fitted, sample: str, prefix: str) -> dict[str, float]:
    """A model, as served (with its TTA views), on a shifted sample: accuracy per condition, and their mean with a
    95 % bootstrap interval over the images (each image's share of the conditions it survives)."""
    correct = []
    for condition in shifts.CONDITIONS:
        probabilities, labels = fitted.predict(sample, tuple(shifted_view(condition, v) for v in job.tta))
        correct.append(probabilities.argmax(axis=1) == labels)
    correct = np.array(correct)
    low, high = stats.accuracy_interval(correct.mean(axis=0))
    return {f"{prefix}accuracy": float(correct.mean()), f"{prefix}accuracy_ci_low": low,
            f"{prefix}accuracy_ci_high": high,
            **{prefix + c.replace(":", "_"): float(row.mean()) for c, row in zip(shifts.CONDITIONS, correct)}}


def log_results(job: Job, inputs: Inputs, trained: Trained, tested: Evaluation, output_dir: Path) -> None:
    """Plots, and the evaluations as data for reports and paired comparisons: per-class accuracy, the test
    confusion matrix (rows: true class, columns: predicted), and every validation and test image's prediction, by
    its index in the split."""
    class_names = inputs.splits.class_names
    sizes = inputs.network.image_sizes
    images, labels = next(iter(make_batches(inputs.splits.test, sizes, job.export.sample_predictions)))
    shown = images[max(sizes, key=sizes.get)] if isinstance(sizes, dict) else images  # the largest
    figures = {
        "plots/training_curves.png": plots.training_curves(trained.curves, job.run_name),
        "plots/confusion_matrix.png": plots.confusion_matrix(tested.confusion, class_names,
                                                             f"{job.run_name}: test confusion matrix"),
        "plots/test_predictions.png": plots.sample_predictions(
            shown.numpy(), labels.numpy(), predict_views(trained.final.model, images, job.tta).numpy(), class_names,
            f"{job.run_name}: test predictions"),
    }
    for artifact_file, figure in figures.items():
        mlflow.log_figure(figure, artifact_file)
        plots.plt.close(figure)
    output_dir.mkdir(parents=True, exist_ok=True)
    confusion = pd.DataFrame(tested.confusion, index=pd.Index(class_names, name="true"), columns=class_names)
    files = {"per_class_accuracy.csv": lambda path: tested.per_class.to_csv(path, index=False),
             "test_confusion_matrix.csv": confusion.to_csv, "test_predictions.csv": tested.predictions.to_csv,
             "validation_predictions.csv": trained.validation.predictions.to_csv}
    for name, write in files.items():
        write(output_dir / name)
        mlflow.log_artifact(str(output_dir / name))


def export(job: Job, inputs: Inputs, final: Fitted, output_dir: Path) -> dict[str, float]:
    """The SavedModel (image bytes in, top-k out, with the job's test-time views) and the MLflow model around it;
    returns what serving it costs (latency of one test image, backbone passes, size), as logged."""
    saved_model = export_saved_model(
        final.model, inputs.network, inputs.splits.class_names, job.export.top_k,
        output_dir / "saved_model" / job.export.model_name / str(job.export.version), views=job.tta)
    mlflow.log_artifacts(str(saved_model.parent.parent), "saved_model")
    example = next(iter(inputs.splits.test.take(1)))[0].numpy()
    cost = serving_cost(saved_model, example, len(inputs.network.backbones), len(job.tta))
    mlflow.log_metrics(cost)
    log_pyfunc_model(saved_model, [example])
    return cost
