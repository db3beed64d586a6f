"""Training stages and the plan that runs them.

A stage fits a model and returns what it made (`Fitted`): the model (uint8 image -> probabilities, what is
exported), a predictor for any split and views, its curves, and the budget it selected (epochs, or a
regularisation strength) that a refit replays. The stages:
- `DenseHead`: a Keras softmax head on the frozen backbones, from cached features or through the images;
- `LogisticRegressionHead`: multinomial L2 logistic regression (scikit-learn) on cached features, the baseline;
- `FineTune`: stage 2, the backbones unfrozen, with augmentation, on the images.

A `Round` says what a run of the stages fits on and watches. The `Plan` runs its stages for selection (fit on
train, select on validation), replays them with the recorded budgets on train + validation (a refit), and
cross-validates the first stage on train + validation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.linear_model import LogisticRegression

from src import track
from src.data import Splits, make_batches
from src.evaluate import accuracy, negative_log_likelihood
from src.features import Features
from src.model import Network, build_head, normalization, predict_batches
from src.spec import Job
from src.train import Schedule, compile_model, fit
from src.views import fixed_views, predict_views, split_view, viewed_images

log = logging.getLogger(__name__)

# (split, views) -> (the mean of the probabilities over the views [images, classes], labels)
Predictor = Callable[[str, tuple[str, ...]], tuple[np.ndarray, np.ndarray]]


@dataclass
class Fitted:
    model: keras.Model  # uint8 image -> probabilities
    predict: Predictor
    curves: pd.DataFrame  # one row per epoch (index from 1) or per grid value: train/*, val/* loss and accuracy
    budgets: tuple[dict, ...]  # what each stage so far selected, e.g. ({"epochs": 12}, {"epochs": 3})


@dataclass(frozen=True)
class Round:
    """What one run of the stages fits on and watches. With `validation`, each stage records its curve on it and,
    unless given a budget, selects on it (early stopping, or the best grid value); `early_stopping=False` trains
    the whole budget anyway (cross-validation, which averages whole curves). A refit watches nothing."""
    train: tuple[str, ...] = ("train",)
    validation: str | None = "validation"
    early_stopping: bool = True
    callbacks: tuple[keras.callbacks.Callback, ...] = ()


@dataclass
class Context:
    """What every stage reads: the job, its data, its network, and the cached features when the job uses them."""
    job: Job
    splits: Splits
    network: Network
    strategy: tf.distribute.Strategy
    features: Features | None = None

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)


@dataclass
class CrossValidation:
    accuracy: float  # the mean over the folds, at the selected budget
    loss: float
    fold_accuracies: list[float]
    budget: dict
    curve: pd.DataFrame = field(repr=False)  # the mean of the folds' val curves


class DenseHead:
    """A Keras softmax head on the frozen backbones: trained on their cached features when the job uses the cache,
    else end to end through the images (with the job's augmentation)."""

    def fit(self, ctx: Context, rnd: Round, budget: dict | None, previous: Fitted | None) -> Fitted:
        job, network = ctx.job, ctx.network
        epochs = budget["epochs"] if budget else job.epochs
        patience = job.patience if rnd.early_stopping and not budget else None
        if ctx.features is not None:
            with ctx.strategy.scope():
                head = build_head(ctx.num_classes, job.head, ctx.features.widths)
                compile_model(head, job.optimizer, job.lr, job.head.label_smoothing)
            train = _feature_batches(ctx.features.stack(rnd.train, job.train_views), job.batch_size, job.seed)
            validation = rnd.validation and _feature_batches(ctx.features.get(rnd.validation), job.batch_size)
            callbacks, monitor = rnd.callbacks, "val_accuracy"
            if rnd.validation and job.select_on != "clean":
                callbacks = (SelectionValidation(head, ctx.features, job), *callbacks)
                monitor = "val_selection"
            if rnd.validation:  # first, so that the callbacks after it read its val_accuracy
                callbacks = (HeldOutScores(head, *ctx.features.get(rnd.validation)), *callbacks)
            history = fit(head, train, validation, Schedule(epochs, patience, monitor=monitor), callbacks, job.verbose)
            model, predict = network.classifier(head), _feature_predictor(head, ctx.features, job.batch_size)
            curves = _curves(history)  # HeldOutScores put val/accuracy on its grid
        else:
            with ctx.strategy.scope():
                head = build_head(ctx.num_classes, job.head, network.widths)
                model = network.classifier(head, job.augmentation, job.seed)
                compile_model(model, job.optimizer, job.lr, job.head.label_smoothing)
            validation = rnd.validation and _split_batches(ctx, rnd.validation)
            history = fit(model, _training_batches(ctx, rnd.train), validation, Schedule(epochs, patience),
                          rnd.callbacks, job.verbose)
            predict = _image_predictor(ctx, model)
            curves = _curves(history, validation_images=_images(ctx, rnd.validation))
        selected = int(curves[selection_column(curves)].idxmax()) if patience is not None else epochs
        return Fitted(model, predict, curves, ({"epochs": selected},))


class LogisticRegressionHead:
    """Multinomial L2 logistic regression (scikit-learn, lbfgs) on the cached features, unit-normalised per
    backbone when model.normalize_features. C comes from model.c_grid: the first with the best val accuracy (the
    grid is in ascending order, so the strongest regularisation wins a tie). Its coefficients become the Dense
    layer of the same head as DenseHead's, so the model exports and serves like any other."""

    def fit(self, ctx: Context, rnd: Round, budget: dict | None, previous: Fitted | None) -> Fitted:
        job, features = ctx.job, ctx.features
        normalize = normalization(features.widths)
        prepared = (lambda x: np.asarray(normalize(x))) if job.head.normalize_features else (lambda x: x)  # noqa: E731
        x, y = features.stack(rnd.train, job.train_views)
        x = prepared(x)
        grid = [budget["C"]] if budget else sorted(job.head.c_grid)
        sample = selection_sample(features, job) if rnd.validation and job.select_on != "clean" else None
        rows, models = [], []
        for c in grid:
            classifier = LogisticRegression(C=c, max_iter=job.head.max_iter, tol=job.head.tol).fit(x, y)
            row = {"C": c, "iterations": int(classifier.n_iter_.max()),
                   **_scores(classifier, x, y, ctx.num_classes, "train")}
            if rnd.validation:
                row |= _scores(classifier, prepared(features.get(rnd.validation)[0]),
                               features.get(rnd.validation)[1], ctx.num_classes, "val")
                if sample is not None:
                    other = sample_accuracy(lambda x: _probabilities(classifier, prepared(x), ctx.num_classes),
                                            *sample)
                    row[f"val/{SAMPLE_METRIC[job.select_on]}"] = other
                    row["val/selection"] = selection_value(job.select_on, row["val/accuracy"], other)
            rows.append(row)
            models.append(classifier)
            log.info("logistic regression C=%g: %s", c, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                                 for k, v in row.items() if k != "C"))
        curves = pd.DataFrame(rows).set_index("C")
        if rnd.validation and rnd.early_stopping:  # the selection's grid, as a curve in the MLflow UI
            for step, row in enumerate(rows, start=1):
                mlflow.log_metrics({"c_grid/C": row["C"], "c_grid/val_accuracy": row["val/accuracy"],
                                    "c_grid/val_loss": row["val/loss"], "c_grid/iterations": row["iterations"]},
                                   step=step)
        best = 0 if budget else int(np.argmax(curves[selection_column(curves)].to_numpy()))
        if not budget and len(grid) > 1 and best in (0, len(grid) - 1):
            log.warning("C=%g is at the edge of model.c_grid: a wider grid may find a better C", grid[best])
        head = self._head(ctx, models[best])
        return Fitted(ctx.network.classifier(head), _feature_predictor(head, features, job.batch_size), curves,
                      ({"C": float(grid[best])},))

    @staticmethod
    def _head(ctx: Context, classifier: LogisticRegression) -> keras.Sequential:
        head = build_head(ctx.num_classes, ctx.job.head, ctx.features.widths)
        kernel = np.zeros((sum(ctx.features.widths), ctx.num_classes), np.float32)
        bias = np.full(ctx.num_classes, -1e9, np.float32)  # a class absent from training is never predicted
        kernel[:, classifier.classes_] = classifier.coef_.T
        bias[classifier.classes_] = classifier.intercept_
        head.layers[-2].set_weights([kernel, bias])  # the Dense layer, before the softmax
        return head


def _probabilities(classifier: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Every class's probability, a class the classifier never saw at 1e-12."""
    probabilities = np.full((len(x), num_classes), 1e-12)
    probabilities[:, classifier.classes_] = classifier.predict_proba(x)
    return probabilities


def _scores(classifier: LogisticRegression, x: np.ndarray, y: np.ndarray, num_classes: int, prefix: str) -> dict:
    """Accuracy and loss, as a Keras head's curves name them; a logistic regression's loss is its NLL."""
    probabilities = _probabilities(classifier, x, num_classes)
    nll = negative_log_likelihood(probabilities, y)
    return {f"{prefix}/accuracy": accuracy(probabilities, y), f"{prefix}/loss": nll, f"{prefix}/nll": nll}


class FineTune:
    """Stage 2: the backbones unfrozen at lr * finetune.lr_scale, with model.augmentation's layers, on the images,
    epochs counted on from stage 1's. Selection keeps stage 2 only if it beats stage 1 on validation."""

    def fit(self, ctx: Context, rnd: Round, budget: dict | None, previous: Fitted) -> Fitted:
        job, network, settings = ctx.job, ctx.network, ctx.job.finetune
        before = previous.model.get_weights()  # stage 1: its head, and the backbones it shares with stage 2
        frozen = [backbone.trainable for backbone in network.backbones]
        with ctx.strategy.scope():
            model = network.classifier(previous.model.get_layer("head"),
                                       dataclasses.replace(job.augmentation, enabled=True), job.seed)
            for backbone in network.backbones:
                backbone.trainable = True
            compile_model(model, job.optimizer, job.lr * settings.lr_scale, job.head.label_smoothing)
        first = len(previous.curves)
        selecting = budget is None
        schedule = Schedule(first + (budget["epochs"] if budget else settings.epochs),
                            settings.patience if selecting else None, initial_epoch=first)
        history = fit(model, _training_batches(ctx, rnd.train), rnd.validation and _split_batches(ctx, rnd.validation),
                      schedule, rnd.callbacks, job.verbose)
        for backbone, trainable in zip(network.backbones, frozen):  # as configured, for a refit
            backbone.trainable = trainable
        curves = _curves(history, first, _images(ctx, rnd.validation))
        if selecting:
            mlflow.log_metric("finetune/first_epoch", first + 1)
            if not curves["val/accuracy"].max() > previous.curves["val/accuracy"].max():
                # Stage 2 changed layers that stage 1's model shares (the head, the backbones): put them back, and
                # keep stage 1's model, with a zero budget that a refit skips.
                previous.model.set_weights(before)
                return Fitted(previous.model, previous.predict, pd.concat([previous.curves, curves]),
                              (*previous.budgets, {"epochs": 0}))
        epochs = budget["epochs"] if budget else int(curves["val/accuracy"].idxmax()) - first
        return Fitted(model, _image_predictor(ctx, model), pd.concat([previous.curves, curves]),
                      (*previous.budgets, {"epochs": epochs}))


class Plan:
    """The job's stages in order: a head (DenseHead or LogisticRegressionHead), then FineTune if enabled."""

    def __init__(self, job: Job):
        self.job = job
        self.stages = [LogisticRegressionHead() if job.head.kind == "logistic_regression" else DenseHead()]
        if job.finetune:
            self.stages.append(FineTune())

    def select(self, ctx: Context, callbacks=()) -> Fitted:
        """Fit on train, select on validation. The backbones' weights are kept, for a refit to start from."""
        self._pretrained = [backbone.get_weights() for backbone in ctx.network.backbones]
        keras.utils.set_random_seed(self.job.seed)
        return self._run(ctx, Round(callbacks=tuple(callbacks)))

    def refit(self, ctx: Context, budgets: tuple[dict, ...]) -> Fitted:
        """The same stages from the pretrained backbones and the same seed on train + validation, each for its
        recorded budget (job.refit "steps": an epoch count scaled to the selection's number of steps)."""
        for backbone, weights in zip(ctx.network.backbones, self._pretrained):
            backbone.set_weights(weights)
        if self.job.refit == "steps":
            budgets = tuple({"epochs": self._matched_epochs(ctx, b["epochs"])} if "epochs" in b else b for b in budgets)
        log.info("refit on train + validation with %s", budgets)
        mlflow.log_metrics({f"refit/stage{i}_{k}": v for i, b in enumerate(budgets, start=1) for k, v in b.items()})
        keras.utils.set_random_seed(self.job.seed)
        rnd = Round(train=("train", "validation"), validation=None, callbacks=(track.EpochMetrics("refit/"),))
        return self._run(ctx, rnd, budgets)

    def cross_validate(self, ctx: Context, k: int) -> CrossValidation:
        """The first stage on k stratified folds of train + validation, each fold's whole curve (every epoch, or
        every grid value) on its held-out images; the budget with the best mean over the folds is selected."""
        head = self.stages[0]
        budget = {"epochs": self.job.epochs} if isinstance(head, DenseHead) else None
        curves = []
        for i, fold in enumerate(ctx.features.folds(k, self.job.seed, self.job.train_views), start=1):
            keras.utils.set_random_seed(self.job.seed)
            fitted = head.fit(dataclasses.replace(ctx, features=fold), Round(early_stopping=False), budget, None)
            curves.append(fitted.curves[["val/accuracy", "val/loss", "val/nll"]])
            log.info("fold %d/%d: best val accuracy %.4f", i, k, fitted.curves["val/accuracy"].max())
        mean = sum(curves) / k
        best = mean["val/accuracy"].idxmax()
        key = "epochs" if isinstance(head, DenseHead) else "C"
        return CrossValidation(float(mean.loc[best, "val/accuracy"]), float(mean.loc[best, "val/nll"]),
                               [float(c.loc[best, "val/accuracy"]) for c in curves],
                               {key: int(best) if key == "epochs" else float(best)}, mean)

    def _run(self, ctx: Context, rnd: Round, budgets: tuple[dict, ...] | None = None) -> Fitted:
        fitted = None
        for i, stage in enumerate(self.stages):
            budget = budgets[i] if budgets else None
            if budget == {"epochs": 0}:  # a stage that selection did not keep
                break
            fitted = stage.fit(ctx, rnd, budget, fitted)
        return fitted

    def _matched_epochs(self, ctx: Context, epochs: int) -> int:
        """`epochs` as selected, on train (or with k-fold CV on a fold's k - 1 parts of train + validation), as an
        epoch count on train + validation with about the same number of steps."""
        sizes = {name: _images(ctx, name) for name in ("train", "validation")}
        whole = sizes["train"] + sizes["validation"]
        k = self.job.cv_folds
        selected_on = whole * (k - 1) / k if k else sizes["train"]
        batches = lambda n: math.ceil(n * len(self.job.train_views) / self.job.batch_size)  # noqa: E731
        return max(1, round(epochs * batches(selected_on) / batches(whole)))


SHIFTED_VALIDATION = "shifted_validation"


def selection_column(curves: pd.DataFrame) -> str:
    """The curve that selects: val/selection when the job selects on more than validation as it is (shifted, or
    through its test-time views), else val/accuracy."""
    return "val/selection" if "val/selection" in curves else "val/accuracy"


# trainer.select_on -> the accuracy it reads besides validation as it is, named val/<this> per epoch
SAMPLE_METRIC = {"shifted": "shifted_accuracy", "mean": "shifted_accuracy", "served": "served_accuracy"}


def selection_value(select_on: str, clean: float, other: float) -> float:
    return {"clean": clean, "shifted": other, "mean": (clean + other) / 2, "served": other}[select_on]


def selection_sample(features: Features, job: Job) -> tuple[list[np.ndarray], np.ndarray]:
    """What selection reads besides validation as it is, as features per view and labels: the shifted validation
    sample under every condition, stacked into one array (all conditions together are their mean: each holds
    the same images); or, for select_on=served, validation through each of the model's test-time views."""
    if job.select_on == "served":
        return [features.get("validation", view)[0] for view in job.tta], features.labels["validation"]
    names = [v for split, v in features.arrays if split == SHIFTED_VALIDATION and v.startswith("shift:")]
    stacked, labels = features.stack((SHIFTED_VALIDATION,), names)
    return [stacked], labels


def sample_accuracy(predict, views: list[np.ndarray], labels: np.ndarray) -> float:
    """The accuracy of the mean of `predict`'s probabilities over the views, as a served model averages them."""
    return accuracy(np.mean([predict(x) for x in views], axis=0), labels)


class SelectionValidation(keras.callbacks.Callback):
    """After each epoch, the head's accuracy on selection_sample as val_shifted_accuracy or val_served_accuracy,
    and what selects as val_selection."""

    def __init__(self, head: keras.Model, features: Features, job: Job):
        super().__init__()
        self.head, self.select_on = head, job.select_on
        self.views, self.labels = selection_sample(features, job)

    def on_epoch_end(self, epoch, logs=None):
        other = sample_accuracy(lambda x: self.head.predict(x, batch_size=4096, verbose=0), self.views, self.labels)
        logs[f"val_{SAMPLE_METRIC[self.select_on]}"] = other
        logs["val_selection"] = selection_value(self.select_on, logs["val_accuracy"], other)


class HeldOutScores(keras.callbacks.Callback):
    """After each epoch, the head's val_accuracy as right answers / images in float64 (Keras's is float32, and the
    same count then does not tie with a logistic regression's) and its val_nll without label smoothing: what
    cross-validation averages over the folds, so that both heads' folds are scored alike."""

    def __init__(self, head: keras.Model, features: np.ndarray, labels: np.ndarray):
        super().__init__()
        self.head, self.features, self.labels = head, features, labels

    def on_epoch_end(self, epoch, logs=None):
        probabilities = np.concatenate([keras.ops.convert_to_numpy(self.head(self.features[start:start + 4096],
                                                                              training=False))
                                        for start in range(0, len(self.features), 4096)])
        logs["val_accuracy"] = accuracy(probabilities, self.labels)
        logs["val_nll"] = negative_log_likelihood(probabilities, self.labels)


# val_nll is not one of the metrics logged per epoch: under the name val/nll it would hide the run's own val/nll
_CURVE_NAMES = {**track.EPOCH_METRICS, "val_nll": "val/nll"}


def _curves(history: keras.callbacks.History, first: int = 0, validation_images: int = 0) -> pd.DataFrame:
    """Per-epoch curves, val/accuracy put back on its grid of right answers / `validation_images`: trained
    through the images, Keras reports it in float32, in which the same count does not equal a logistic
    regression's or a cached head's float64 (0.92058825 against 0.92058824), nor tie with it."""
    curves = pd.DataFrame(history.history).rename(columns=_CURVE_NAMES)
    curves.index = pd.RangeIndex(first + 1, first + 1 + len(curves), name="epoch")
    if validation_images:
        curves["val/accuracy"] = (curves["val/accuracy"] * validation_images).round() / validation_images
    return curves


def _images(ctx: Context, split: str | None) -> int:
    """The number of images of a split (every split and sample has a known cardinality); 0 for none."""
    return int(ctx.splits.get(split).cardinality()) if split else 0


def _feature_batches(split_features, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(split_features)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(split_features[1]), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _feature_predictor(head: keras.Model, features: Features, batch_size: int) -> Predictor:
    def predict(split, views):
        outputs = [predict_batches(head, _feature_batches(features.get(split, v), batch_size)) for v in views]
        return np.mean([probabilities for probabilities, _ in outputs], axis=0), outputs[0][1]
    return predict


def _training_batches(ctx: Context, names: tuple[str, ...]) -> tf.data.Dataset:
    """Shuffled training batches of the named splits, each image in every one of the job's training views."""
    job = ctx.job
    ds = ctx.splits.get(names[0])
    for name in names[1:]:
        ds = ds.concatenate(ctx.splits.get(name))

    def batches(images):
        return make_batches(images, ctx.network.image_sizes, job.batch_size, cache=job.data.cache, shuffle_seed=job.seed)

    plain = batches(ds)
    if len(job.train_views) == 1:
        return plain
    streams = []
    for name in job.train_views:
        image, fixed = split_view(name)
        source = batches(viewed_images(ds, image, job.seed)) if image else plain
        streams.append(source.map(lambda images, labels, fixed=fixed: (fixed_views(images, fixed), labels)))
    return tf.data.Dataset.sample_from_datasets(streams, seed=job.seed)


def _split_batches(ctx: Context, name: str) -> tf.data.Dataset:
    return make_batches(ctx.splits.get(name), ctx.network.image_sizes, ctx.job.batch_size, cache=ctx.job.data.cache)


def _image_predictor(ctx: Context, model: keras.Model) -> Predictor:
    """Through the images: one decode per image view, its fixed views averaged in one graph."""
    def predict(split, views):
        groups = {}
        for name in views:
            image, fixed = split_view(name)
            groups.setdefault(image, []).append(fixed)
        outputs = []
        for image, fixed in groups.items():
            images = ctx.splits.get(split)
            images = viewed_images(images, image, ctx.job.seed) if image else images
            outputs.append(predict_batches(lambda x, training=False, fixed=fixed: predict_views(model, x, fixed),
                                           make_batches(images, ctx.network.image_sizes, ctx.job.batch_size)))
        if len(outputs) == 1:
            return outputs[0]
        weights = [len(fixed) for fixed in groups.values()]
        return np.average([p for p, _ in outputs], axis=0, weights=weights), outputs[0][1]
    return predict
