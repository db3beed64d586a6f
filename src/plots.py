"""Matplotlib figures: training curves, confusion matrix, grids of sample predictions and dataset examples."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def training_curves(history: pd.DataFrame, title: str) -> plt.Figure:
    """`history` has one row per epoch and columns such as train/loss, val/accuracy."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            column = f"{split}/{metric}"
            if column in history:
                ax.plot(history.index, history[column], marker="o", markersize=3, label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def confusion_matrix(confusion: np.ndarray, class_names: list[str], title: str) -> plt.Figure:
    n = len(class_names)
    side = max(6.0, 0.14 * n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), constrained_layout=True)
    image = ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    fontsize = 4 if n > 50 else 8
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, shrink=0.6, label="images")
    return fig


def image_grid(images, titles: list[str], title: str, colors: list[str] | None = None, cols: int = 4) -> plt.Figure:
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text, color in zip(axes.flat, images, titles, colors or ["black"] * len(images)):
        ax.imshow(image)
        ax.set_title(text, color=color, fontsize=9)
    fig.suptitle(title)
    return fig


def sample_predictions(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                       class_names: list[str], title: str) -> plt.Figure:
    """Each image titled with its top-1 prediction: green when right, red when wrong."""
    predicted = probabilities.argmax(axis=1)
    titles = [f"{class_names[p]} ({probs[p]:.0%})\ntrue: {class_names[label]}"
              for p, probs, label in zip(predicted, probabilities, labels)]
    colors = ["green" if p == label else "red" for p, label in zip(predicted, labels)]
    return image_grid(images, titles, title, colors)


def dataset_examples(images: list[np.ndarray], labels: list[int], class_names: list[str], title: str) -> plt.Figure:
    """The dataset as it is: images at their own size and aspect, titled with their class."""
    return image_grid(images, [f"{class_names[label]} ({label})" for label in labels], title, cols=5)
