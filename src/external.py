"""A model on photos from outside its training data, scored through the model as it is served (image bytes in,
top-k out) and logged as an MLflow evaluation run: a labelled folder `<root>/<class name>/*`, and the test split
(or a folder) under the shifts of src/shifts.py.

Folder names are matched to the model's class names case-insensitively, with `_` and `-` equal to a space. Every
file goes through the served model's own image checks first, so a bad file stops the evaluation with the message
the server would give, before anything is logged.
"""

from __future__ import annotations

import difflib
import io
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import MlflowException
from PIL import Image

from src import evaluate, plots, progress, shifts, stats
from src.config import UserError
from src.pyfunc_model import LIMITS, read_image

log = logging.getLogger(__name__)

BATCH = 16
OTHER = "any other class"
MISTAKES = 12


@dataclass
class Scored:
    """Each image's label and the model's answer: label, predicted (class indices), confidence, top5 (a list)."""
    frame: pd.DataFrame
    class_names: list[str]
    metrics: dict[str, float]
    images: list[bytes]  # what was scored, in the frame's order
    files: list[Path] | None = None


def load_model(model_uri: str):
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise UserError(f"cannot load {model_uri}: {' '.join(str(error).split())[:200]}; give a model URI such as "
                        "runs:/<run id>/model or models:/flowers@champion") from None


def normalise(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_-]", " ", name)).strip().casefold()


def match_folders(root: Path, class_names: list[str]) -> dict[Path, int]:
    """Each class folder of `root` -> the model's label for it; one-line errors for what does not match."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; lay out photos as {root}/<class name>/*.jpg")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root} holds no class folders; lay out photos as {root}/<class name>/*.jpg")
    known = {normalise(name): label for label, name in enumerate(class_names)}
    matched = {}
    for folder in folders:
        if normalise(folder.name) not in known:
            closest = difflib.get_close_matches(normalise(folder.name), list(known), n=3, cutoff=0.4)
            hint = f"closest: {', '.join(class_names[known[c]] for c in closest)}" if closest else \
                "the model knows none like it"
            raise UserError(f"folder {folder.name!r} is not a class of the model ({hint}); rename or remove it")
        matched[folder] = known[normalise(folder.name)]
    return matched


def read_folder(root: Path, class_names: list[str]) -> tuple[list[Path], list[bytes], np.ndarray]:
    """The photos of every class folder, checked as the served model checks them: (files, bytes, labels)."""
    files, images, labels = [], [], []
    for folder, label in match_folders(root, class_names).items():
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                data, _ = read_image(path.read_bytes(), len(files), LIMITS["max_pixels"])
            except MlflowException as error:
                raise UserError(f"{path}: {error.message}; remove or replace the file") from None
            files.append(path)
            images.append(data)
            labels.append(label)
    if not files:
        raise UserError(f"the class folders of {root} hold no photos")
    return files, images, np.array(labels)


def score(model, images: list[bytes], labels: np.ndarray, description: str, files: list[Path] | None = None) -> Scored:
    """The model's answers for `images`, in batches, and their metrics: accuracy and mean per-class accuracy with
    their 95 % bootstrap intervals (over the images), top-5."""
    class_names = model.unwrap_python_model().class_names
    rows = []
    with progress.bar(len(images), description, "img") as bar:
        for start in range(0, len(images), BATCH):
            out = model.predict(pd.DataFrame({"image": images[start:start + BATCH]}))
            rows += [{"predicted": r["label"], "confidence": r["score"], "top5": [t["label"] for t in r["top_k"][:5]]}
                     for _, r in out.iterrows()]
            bar.update(len(out))
    frame = pd.DataFrame(rows).assign(label=labels)[["label", "predicted", "confidence", "top5"]]
    correct = (frame["predicted"] == frame["label"]).to_numpy()
    metrics = {"n": len(frame), **evaluate.interval_metrics(correct, labels, ""),
               "top5_accuracy": float(np.mean([label in top for label, top in zip(labels, frame["top5"])]))}
    return Scored(frame, class_names, metrics, images, files)


def confusion(scored: Scored, shown_others: int = 8) -> pd.DataFrame:
    """Rows: the classes present; columns: the same classes, then the other classes they were most often taken for,
    then all the rest."""
    names = scored.class_names
    present = sorted(scored.frame["label"].unique())
    outside = scored.frame.loc[~scored.frame["predicted"].isin(present), "predicted"]
    others = list(outside.value_counts().index[:shown_others])
    columns = [names[c] for c in present + others] + [OTHER]
    table = pd.DataFrame(0, index=pd.Index([names[c] for c in present], name="true"), columns=columns)
    for label, predicted in zip(scored.frame["label"], scored.frame["predicted"]):
        table.loc[names[label], names[predicted] if predicted in present + others else OTHER] += 1
    return table


def log_evaluation(model_uri: str, experiment_name: str, run_name: str, scored: Scored,
                   tags: dict | None = None) -> str:
    """An MLflow run tagged evaluation=true, with the model URI as a param, the metrics, the confusion (figure and
    CSV), each image's answer and a grid of the most confident mistakes. Returns its id."""
    mlflow.set_experiment(experiment_name)
    table = confusion(scored)
    frame = scored.frame.assign(true=[scored.class_names[i] for i in scored.frame["label"]],
                                answer=[scored.class_names[i] for i in scored.frame["predicted"]])
    if scored.files is not None:
        frame.insert(0, "file", [str(f) for f in scored.files])
    with mlflow.start_run(run_name=run_name, tags={"evaluation": "true", **(tags or {})}) as run:
        mlflow.log_param("model_uri", model_uri)
        mlflow.log_metrics(scored.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "confusion.csv")
            frame.to_csv(Path(tmp) / "predictions.csv", index_label="index")
            mlflow.log_artifacts(tmp)
        figures = {"confusion.png": plots.answer_counts(
            table, f"{run_name}: answers per true class (accuracy {scored.metrics['accuracy']:.3f})")}
        wrong = frame[frame["label"] != frame["predicted"]].nlargest(MISTAKES, "confidence")
        if len(wrong):
            pictures = [np.asarray(Image.open(io.BytesIO(scored.images[i])).convert("RGB")) for i in wrong.index]
            titles = [f"{a} ({c:.0%})\ntrue: {t}" for a, c, t in zip(wrong["answer"], wrong["confidence"], wrong["true"])]
            figures["mistakes.jpg"] = plots.image_grid(pictures, titles, f"{run_name}: the most confident mistakes",
                                                       colors=["red"] * len(pictures))
        for name, figure in figures.items():
            mlflow.log_figure(figure, name)
            plots.plt.close(figure)
    return run.info.run_id


def sample_images(model_uri: str, per_class: int, folder: Path | None = None) -> tuple[list[bytes], np.ndarray, str]:
    """The photos to shift: a labelled folder's, or the stratified test sample of the data the model's run trained
    on (conf/robustness: the same sample a run's shifted/test/* metrics use). (bytes, labels, what they are)."""
    from src.data import load_splits
    from src.track import run_config

    model = load_model(model_uri)
    if folder is not None:
        _, images, labels = read_folder(folder, model.unwrap_python_model().class_names)
        return images, labels, str(folder)
    info = mlflow.models.get_model_info(model_uri)
    if not info.run_id:
        raise UserError(f"model {model_uri} was not logged by a training run; pass --folder with labelled photos")
    splits = load_splits(run_config(info.run_id).data).with_sample("sample", "test", per_class, shifts.SEED)
    pairs = list(splits.get("sample").as_numpy_iterator())
    return [image for image, _ in pairs], np.array([label for _, label in pairs]), splits.specs["sample"]


def robustness(model, images: list[bytes], labels: np.ndarray) -> tuple[pd.DataFrame, dict[str, float]]:
    """The model, as served, on the photos as they are and under every shift condition (each shifted photo sent
    as a PNG): one row per condition (shift, severity, accuracy with its interval), and the metrics: clean and
    shifted accuracy (the mean over conditions, with a bootstrap interval over the photos)."""
    rows, correct = [], []
    clean = score(model, images, labels, "clean")
    for condition in shifts.CONDITIONS:
        shifted = [tf.io.encode_png(shifts.apply(tf.io.decode_image(image, channels=3, expand_animations=False),
                                                 condition, i)).numpy() for i, image in enumerate(images)]
        scored = score(model, shifted, labels, condition)
        correct.append((scored.frame["predicted"] == scored.frame["label"]).to_numpy())
        name, severity = condition.split(":")
        rows.append({"shift": name, "severity": int(severity), "accuracy": scored.metrics["accuracy"],
                     "ci_low": scored.metrics["accuracy_ci_low"], "ci_high": scored.metrics["accuracy_ci_high"]})
    per_image = np.mean(correct, axis=0)
    low, high = stats.accuracy_interval(per_image)
    metrics = {"n": len(images), "clean/accuracy": clean.metrics["accuracy"],
               "clean/accuracy_ci_low": clean.metrics["accuracy_ci_low"],
               "clean/accuracy_ci_high": clean.metrics["accuracy_ci_high"],
               "shifted/accuracy": float(per_image.mean()), "shifted/accuracy_ci_low": low,
               "shifted/accuracy_ci_high": high,
               **{f"shifted/{r['shift']}_{r['severity']}": r["accuracy"] for r in rows}}
    return pd.DataFrame(rows), metrics


def log_robustness(model_uri: str, experiment_name: str, table: pd.DataFrame, metrics: dict[str, float],
                   sample: str) -> str:
    """An evaluation run (tags evaluation=true, evaluation.kind=robustness) with the metrics, the table and a
    figure of accuracy per shift and severity. Returns its id."""
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name="robustness", tags={"evaluation": "true", "evaluation.kind": "robustness",
                                                       "evaluation.sample": sample}) as run:
        mlflow.log_param("model_uri", model_uri)
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "robustness.csv", index=False)
            (Path(tmp) / "robustness.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
            mlflow.log_artifacts(tmp)
        figure = plots.robustness(table, metrics["clean/accuracy"], f"{model_uri}: accuracy under shifts ({sample})")
        mlflow.log_figure(figure, "robustness.png")
        plots.plt.close(figure)
    return run.info.run_id
