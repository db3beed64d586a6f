"""Matplotlib figures: training curves, confusion matrix, grids of sample predictions and dataset examples."""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.selection import LATENCY, SCORE, SIZE  # noqa: E402


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
    """The images in a grid, each with its title; the figure's title wrapped to the grid's width."""
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text, color in zip(axes.flat, images, titles, colors or ["black"] * len(images)):
        ax.imshow(image)
        ax.set_title(text, color=color, fontsize=9)
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(14 * cols))), fontsize=11)
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


def validation_curves(curves: dict[str, pd.Series], groups: dict[str, str], best: str, title: str) -> plt.Figure:
    """Val accuracy per epoch, one line per run (keyed by its label), coloured by its configuration (`groups`: run
    label -> a short configuration label), which the legend names; the best run, selected on validation, thick and
    black."""
    fig, ax = plt.subplots(figsize=(11, 5.5), constrained_layout=True)
    colors = plt.get_cmap("tab10").colors
    configurations = sorted(set(groups.values()))
    for name, curve in sorted(curves.items()):
        color = colors[configurations.index(groups[name]) % len(colors)]
        ax.plot(curve.index, curve.values, color=color, linewidth=1.2, alpha=0.7)
    ax.plot(curves[best].index, curves[best].values, color="black", linewidth=2.5, zorder=3)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=label) for i, label in enumerate(configurations)]
    handles.append(plt.Line2D([], [], color="black", linewidth=2.5, label=f"best: {groups[best]}"))
    # the first epochs' low values would squeeze the part where runs differ: start 0.1 below the worst run's best
    low = max(0.0, min(curve.max() for curve in curves.values()) - 0.1)
    ax.set(xlabel="epoch", ylabel="val accuracy", title=title, ylim=(low, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="lower right", fontsize=8, ncols=1 if len(handles) <= 8 else 2)
    return fig


def accuracy_bars(summary: pd.DataFrame, group: str, title: str) -> plt.Figure:
    """Mean val and test accuracy per `group` value, with error bars of one standard deviation over its runs and the
    values printed; the axis zoomed to the data, since the differences are a few points. `summary` has columns
    `group`, n, and <metric>_mean / <metric>_std for val/accuracy_best and test/accuracy."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(summary) + 2), 5), constrained_layout=True)
    x, width = np.arange(len(summary)), 0.38
    tops, bottoms = [], []
    for offset, (metric, label, color) in zip((-width / 2, width / 2), (
            ("val/accuracy_best", "val (selects)", "#9ecae1"), ("test/accuracy", "test (reported)", "#3182bd"))):
        means, stds = summary[f"{metric}_mean"], summary[f"{metric}_std"].where(summary["n"] > 1)  # none for n=1
        bars = ax.bar(x + offset, means, width, yerr=stds, capsize=4, label=label, color=color)
        ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=2, fontsize=8)
        tops.append((means + stds.fillna(0)).max())
        bottoms.append((means - stds.fillna(0)).min())
    span = max(tops) - min(bottoms)
    ax.set_ylim(max(0.0, min(bottoms) - 0.3 * span - 0.01), min(1.0, max(tops) + 0.15 * span + 0.01))
    ax.set_xticks(x, [f"{value}\n(n={n})".replace("+", "+\n") for value, n in zip(summary[group], summary["n"])],
                  fontsize=8)
    ax.set_ylabel("accuracy (axis zoomed to the data)")
    ax.set_title(title, fontsize=10, wrap=True)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", ncols=2, fontsize=8)
    return fig


def accuracy_vs_lr(summary: pd.DataFrame, title: str, connect: bool = True) -> plt.Figure:
    """Val and test accuracy against the learning rate (log axis), one colour per batch size (and backbone, when
    there are several); mean over runs, with error bars where there are several. Points are joined by lines only
    when `connect`: when nothing else varies between them."""
    lines = ["backbone", "batch_size"] if summary["backbone"].nunique() > 1 else ["batch_size"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, constrained_layout=True)
    for ax, (metric, split) in zip(axes, (("val/accuracy_best", "val (selects)"), ("test/accuracy", "test (reported)"))):
        for key, rows in summary.sort_values("lr").groupby(lines):
            ax.errorbar(rows["lr"], rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"].where(rows["n"] > 1),
                        marker="o", markersize=4, capsize=3, linestyle="-" if connect else "none",
                        label=", ".join([*key[:-1], f"batch {key[-1]}"]))
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="accuracy", title=split)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def accuracy_vs_cost(runs: pd.DataFrame, title: str) -> plt.Figure:
    """Each run's selection score and test accuracy against its one-image latency and its size (log axes), the runs
    of each Pareto front in black, joined (`runs`: report.pareto's columns). The fronts are chosen on the score;
    the test panels show how the same runs do on test."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharey="col", constrained_layout=True)
    for row, (cost, front, cost_label) in zip(axes, ((LATENCY, "pareto_latency", "latency, one image (ms)"),
                                                     (SIZE, "pareto_size", "SavedModel size (MB)"))):
        on_front = runs[runs[front]].sort_values(cost)
        for ax, (metric, label) in zip(row, ((SCORE, "selection score (val accuracy; selects)"),
                                             ("test/accuracy", "test accuracy (reported)"))):
            ax.scatter(runs[cost], runs[metric], color="#9ecae1", label="run")
            ax.plot(on_front[cost], on_front[metric], color="black", marker="o", markersize=5, drawstyle="steps-post",
                    label="Pareto front (on the selection score)")
            ax.set_xscale("log")
            for axis_format in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis_format(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))  # 20, 30, not 2x10^1
            ax.set(xlabel=cost_label, ylabel=label)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def confused_classes(confusion: pd.DataFrame, title: str, max_classes: int = 14) -> plt.Figure:
    """The confusion matrix (rows: true, columns: predicted) restricted to the classes in its largest
    off-diagonal cells, at most `max_classes`."""
    counts = confusion.to_numpy().copy()
    np.fill_diagonal(counts, 0)
    classes: list[int] = []
    for flat in np.argsort(-counts, axis=None):
        true, predicted = np.unravel_index(flat, counts.shape)
        if counts[true, predicted] == 0 or len(classes) >= max_classes:
            break
        pair = [c for c in (true, predicted) if c not in classes]
        if len(classes) + len(pair) <= max_classes:  # both classes of a confusion, or neither
            classes += pair
    return answer_counts(confusion.iloc[classes, classes], title)


def answer_counts(table: pd.DataFrame, title: str) -> plt.Figure:
    """Counts of answers (columns) per true class (rows), written in the cells; mistakes coloured, the cells where
    the answer is the true class grey."""
    values = table.to_numpy()
    right = np.array([[row == column for column in table.columns] for row in table.index])
    errors = np.ma.masked_array(values, mask=right)  # colour the mistakes only
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(table.columns) + 3), max(4.0, 0.6 * len(table) + 2.5)),
                           constrained_layout=True)
    cmap = plt.get_cmap("Reds").with_extremes(bad="#e8e8e8")
    image = ax.imshow(errors, cmap=cmap, interpolation="nearest", vmin=0)
    for (i, j), value in np.ndenumerate(values):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if not right[i, j] and value > errors.max() / 2 else "black")
    ax.set_xticks(range(len(table.columns)), table.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.7, label="images of the row's class answered as the column's")
    return fig


def robustness(table: pd.DataFrame, clean: float, title: str) -> plt.Figure:
    """Accuracy per shift (groups) and severity (bars), with its interval, against the clean accuracy (a line)."""
    names = list(dict.fromkeys(table["shift"]))
    severities = sorted(table["severity"].unique())
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(names) + 2), 4.8), constrained_layout=True)
    width = 0.8 / len(severities)
    for i, severity in enumerate(severities):
        rows = table[table["severity"] == severity].set_index("shift").loc[names]
        x = np.arange(len(names)) + (i - (len(severities) - 1) / 2) * width
        ax.bar(x, rows["accuracy"], width, yerr=[rows["accuracy"] - rows["ci_low"], rows["ci_high"] - rows["accuracy"]],
               capsize=2, label=f"severity {severity}", color=plt.get_cmap("Blues")(0.4 + 0.2 * i))
    ax.axhline(clean, color="black", linestyle="--", linewidth=1, label=f"clean {clean:.3f}")
    ax.set_xticks(np.arange(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right")
    ax.set(ylabel="accuracy", ylim=(0, 1))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def accuracy_column(comparison: pd.DataFrame) -> str:
    """The `<split>/accuracy` column of a runtime comparison (`runtimes.compare`'s table)."""
    return next(column for column in comparison.columns if column.endswith("/accuracy"))


def model_comparison(table: pd.DataFrame, title: str) -> plt.Figure:
    """Accuracy, size and one-image latency per model (rows of `table`: model, <split>/accuracy, size_mb,
    latency_ms)."""
    accuracy = accuracy_column(table)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
    for ax, (column, label, fmt) in zip(axes, ((accuracy, accuracy.replace("/", " "), "{:.4f}"),
                                               ("size_mb", "size (MB)", "{:.1f}"),
                                               ("latency_ms", "latency, one image (ms)", "{:.1f}"))):
        bars = ax.bar(table["model"], table[column],
                      color=["#3182bd", "#9ecae1", "#fdae6b", "#e6550d", "#a1d99b"][:len(table)])
        ax.bar_label(bars, labels=[fmt.format(v) for v in table[column]], fontsize=8)
        ax.tick_params(axis="x", labelrotation=20)
        if column == accuracy:  # from 0, differences of a point or two would not show
            ax.set_ylim(max(0.0, table[column].min() - 0.05), min(1.0, table[column].max() + 0.02))
        ax.set(title=label, ylabel=label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig
