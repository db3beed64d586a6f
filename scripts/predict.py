"""Top-k flowers for image files, from a running server or in-process from a model URI.

    python scripts/predict.py rose.jpg daisy.png                         # in-process: models:/flowers@champion
    python scripts/predict.py *.jpg --url http://127.0.0.1:8080          # a running `make serve-best`
    python scripts/predict.py rose.jpg --model-uri runs:/<run id>/model --top-k 3 --json
    python scripts/predict.py rose.jpg --tflite outputs/tflite/flowers-v1/int8.tflite   # make export-tflite

--json prints one object per image and line: {"file", "top_k": [{"class_name", "label", "score"}, ...]}.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import pandas as pd
import requests

from src import cli
from src.config import UserError


def predict_url(url: str, images: list[bytes]) -> list[list[dict]]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode()] for i in images]}}
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/invocations") else "/invocations")
    try:
        response = requests.post(endpoint, json=body, timeout=300)
    except requests.ConnectionError as error:
        raise UserError(f"cannot reach a server at {url} ({type(error.__cause__ or error).__name__}); "
                        "is make serve-best running?") from None
    if response.status_code != 200:
        raise UserError(f"the server answered {response.status_code}: {_message(response)}")
    return [p["top_k"] for p in response.json()["predictions"]]


def in_process(model_uri: str):
    """Load the model once; return a function of a batch of images."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        raise UserError(f"cannot load {model_uri}: {' '.join(error.message.split())}") from None

    def predict(images: list[bytes]) -> list[list[dict]]:
        try:
            return list(model.predict(pd.DataFrame({"image": images}))["top_k"])
        except MlflowException as error:
            raise UserError(" ".join(error.message.split())) from None
    return predict


def tflite_model(path: Path, top_k: int):
    """A TFLite export (labels.txt and views.txt beside it) as the server runs it: the same image checks,
    resizing and test-time views as the MLflow model."""
    import tensorflow as tf
    from mlflow.exceptions import MlflowException

    from src.pyfunc_model import LIMITS, read_image
    from src.runtimes import Classifier, ServedRuntime

    labels, views = path.with_name("labels.txt"), path.with_name("views.txt")
    if not all(p.is_file() for p in (path, labels, views)):
        raise UserError(f"{path} or the labels.txt or views.txt beside it is missing; write them with "
                        "make export-tflite")
    names = labels.read_text().splitlines()
    served = ServedRuntime(Classifier(path), names, tuple(views.read_text().split()), min(top_k, len(names)))

    def predict(images: list[bytes]) -> list[list[dict]]:
        try:
            images = [read_image(image, i, LIMITS["max_pixels"])[0] for i, image in enumerate(images)]
        except MlflowException as error:
            raise UserError(error.message) from None
        top = {key: each.numpy() for key, each in served(tf.constant(images)).items()}
        return [[{"class_name": name.decode(), "label": int(label), "score": float(score)}
                 for name, label, score in zip(*row)]
                for row in zip(top["class_names"], top["labels"], top["scores"])]
    return predict


def _message(response: requests.Response) -> str:
    try:
        message = response.json()["message"]
    except (ValueError, KeyError):
        message = response.text
    return " ".join(message.split("Error: ")[-1].split())  # MLflow prefixes a dump of the input


@cli.command
def main(argv: list[str] | None = None) -> int:
    cfg = cli.config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    where.add_argument("--model-uri", help=f"default models:/{cfg.registry.model_name}@champion, in-process")
    where.add_argument("--tflite", type=Path, help="a TFLite export (make export-tflite), run with LiteRT")
    parser.add_argument("--top-k", type=int, help="classes per image; default all the model returns (export.top_k)")
    parser.add_argument("--batch-size", type=int, default=cfg.serve.max_images, help="images per request, at most")
    parser.add_argument("--batch-mb", type=float, default=cfg.serve.max_body_mb / 2,
                        help="image megabytes per request, at most (base64 adds a third; serve.max_body_mb)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    if (args.top_k is not None and args.top_k < 1) or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be positive")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    if args.url:
        predict = lambda images: predict_url(args.url, images)  # noqa: E731
    elif args.tflite:
        predict = tflite_model(args.tflite, args.top_k or cfg.export.top_k)
    else:
        predict = in_process(args.model_uri or f"models:/{cfg.registry.model_name}@champion")
    for files in batches(args.images, args.batch_size, int(args.batch_mb * 2**20)):
        try:
            results = predict([f.read_bytes() for f in files])
        except UserError as error:
            raise UserError(f"{', '.join(map(str, files))}: {error}") from None
        for file, top_k in zip(files, results):
            if args.top_k and args.top_k > len(top_k):
                raise UserError(f"--top-k {args.top_k} is more than the model's {len(top_k)} classes per image")
            show(file, top_k[:args.top_k], args.json)
    return 0


def batches(files: list[Path], most: int, most_bytes: int):
    """Consecutive groups of at most `most` files and `most_bytes` bytes (a larger file goes alone)."""
    batch, size = [], 0
    for file in files:
        length = file.stat().st_size
        if batch and (len(batch) == most or size + length > most_bytes):
            yield batch
            batch, size = [], 0
        batch.append(file)
        size += length
    if batch:
        yield batch


def show(file: Path, top_k: list[dict], as_json: bool) -> None:
    top_k = [{"class_name": t["class_name"], "label": int(t["label"]), "score": float(t["score"])} for t in top_k]
    if as_json:
        print(json.dumps({"file": str(file), "top_k": top_k}), flush=True)
    else:
        print(f"{file}: " + ", ".join(f"{t['class_name']} ({t['label']}) {t['score']:.3f}" for t in top_k), flush=True)


if __name__ == "__main__":
    sys.exit(main())
