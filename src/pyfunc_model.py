"""The MLflow pyfunc model, logged as code: checks every image of a request, then calls the exported SavedModel.

Bad input raises MlflowException(INVALID_PARAMETER_VALUE), which MLflow's scoring server answers with a 400
and the message; the server keeps serving. The file is self-contained: it is copied into the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import mlflow
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # what tf.io.decode_image reads
# Defaults, logged with the model; `mlflow.pyfunc.load_model(uri, model_config={...})` overrides them.
LIMITS = {"max_images": 32, "max_pixels": 50_000_000}
# MLflow's scoring server decodes base64 for the `dataframe_split` and `dataframe_records` formats, and passes
# it on as bytes for `inputs` and `instances`. An image file always has bytes outside this alphabet.
BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def read_image(value, index: int, max_pixels: int) -> bytes:
    """Encoded image bytes (or their base64 text) -> the bytes, once the whole image is known to decode."""
    if isinstance(value, bytes) and BASE64_TEXT.fullmatch(value):
        value = value.decode("ascii")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error as error:
            raise bad_request(f"image {index} is not valid base64 ({error})") from None
    if not isinstance(value, bytes):
        raise bad_request(f"image {index} is a {type(value).__name__}; send the image file's bytes, base64-encoded")
    if not value:
        raise bad_request(f"image {index} is empty; send the image file's bytes, base64-encoded")
    try:
        with Image.open(io.BytesIO(value)) as image:
            if image.format not in FORMATS:
                raise bad_request(f"image {index} is {image.format}; send {', '.join(FORMATS)}")
            width, height = image.size
            if width * height > max_pixels:  # checked on the header, before anything is decoded
                raise bad_request(f"image {index} declares {width}x{height} pixels, over the limit of "
                                  f"{max_pixels:,}; send a smaller image")
            image.load()
    except Image.DecompressionBombError:  # PIL's own guard, at twice its MAX_IMAGE_PIXELS
        raise bad_request(f"image {index} declares over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, over the limit "
                          f"of {max_pixels:,}; send a smaller image") from None
    except UnidentifiedImageError:
        raise bad_request(f"image {index} is not an image; send {', '.join(FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise bad_request(f"image {index} is truncated or corrupt ({error})") from None
    return value


class FlowerClassifier(mlflow.pyfunc.PythonModel):
    """DataFrame with column `image` (encoded JPEG/PNG bytes, or base64 text) -> one row per image:
    class_name, label, score (the top-1) and top_k, a list of {class_name, label, score}."""

    @classmethod
    def from_saved_model(cls, path: str, **limits) -> FlowerClassifier:
        model = cls()
        model._load(path, limits)
        return model

    def load_context(self, context):
        self._load(context.artifacts["saved_model"], context.model_config or {})

    def _load(self, path: str, limits: dict) -> None:
        self._serve = tf.saved_model.load(path).signatures["serving_default"]
        self.limits = {**LIMITS, **limits}

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = list(model_input["image"])
        if not images:
            raise bad_request("the request has no images; send one or more base64 images in column 'image'")
        if len(images) > self.limits["max_images"]:
            raise bad_request(f"{len(images)} images in one request, over the limit of {self.limits['max_images']}; "
                              "send them in smaller batches")
        data = [read_image(value, i, self.limits["max_pixels"]) for i, value in enumerate(images)]
        try:
            out = self._serve(image_bytes=tf.constant(data, dtype=tf.string))
        except tf.errors.InvalidArgumentError as error:  # PIL read them all, so this is rare
            raise bad_request(f"TensorFlow could not decode the images: {error.message.strip().splitlines()[-1]}")
        rows = []
        for labels, names, scores in zip(out["labels"].numpy(), out["class_names"].numpy(), out["scores"].numpy()):
            top_k = [{"class_name": n.decode(), "label": int(l), "score": float(s)}
                     for l, n, s in zip(labels, names, scores)]
            rows.append({**top_k[0], "top_k": top_k})
        return pd.DataFrame(rows, columns=["class_name", "label", "score", "top_k"])


mlflow.models.set_model(FlowerClassifier())
