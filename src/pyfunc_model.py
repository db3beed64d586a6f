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
KNOWN_AS = {"MPO": "JPEG"}  # PIL's name for phone and camera JPEGs that carry extra images (MPF)
# make serve-best sets conf/serve's on the loaded model (`unwrap_python_model().limits`). A decoded pixel takes
# 3 bytes and a flat image compresses to almost nothing, so the pixel limits bound the memory. In-process batch
# scoring has no count limit by default; the per-image guard always holds.
LIMITS = {"max_images": None, "max_pixels": 50_000_000, "max_request_pixels": None}
# MLflow's scoring server decodes base64 for the `dataframe_split` and `dataframe_records` formats, and passes
# it on as bytes for `inputs` and `instances`. An image file always has bytes outside this alphabet (standard
# or URL-safe, maybe wrapped in lines).
BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/_-]+={0,2}")
URL_SAFE = str.maketrans("-_", "+/")


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def from_base64(text: str) -> bytes:
    """Standard or URL-safe base64, maybe wrapped in lines."""
    return base64.b64decode("".join(text.split()).translate(URL_SAFE), validate=True)


def read_image(value, index: int, max_pixels: int) -> tuple[bytes, int]:
    """Encoded image bytes (or their base64 text) -> the bytes and their pixel count, once the whole image is
    known to decode."""
    if isinstance(value, bytes) and BASE64_TEXT.fullmatch(b"".join(value.split())):
        try:
            value = from_base64(value.decode("ascii"))
        except binascii.Error:
            pass  # not base64 after all: read it as the file itself
    elif isinstance(value, str):
        try:
            value = from_base64(value)
        except binascii.Error as error:
            raise bad_request(f"image {index} is not valid base64 ({error})") from None
    if not isinstance(value, bytes):
        raise bad_request(f"image {index} is a {type(value).__name__}; send the image file's bytes, base64-encoded")
    if not value:
        raise bad_request(f"image {index} is empty; send the image file's bytes, base64-encoded")
    try:
        with Image.open(io.BytesIO(value)) as image:
            if KNOWN_AS.get(image.format, image.format) not in FORMATS:
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
    return value, width * height


class FlowerClassifier(mlflow.pyfunc.PythonModel):
    """DataFrame with column `image` (encoded JPEG/PNG bytes, or base64 text) -> one row per image:
    class_name, label, score (the top-1) and top_k, a list of {class_name, label, score}."""

    @classmethod
    def from_saved_model(cls, path: str, **limits) -> FlowerClassifier:
        model = cls()
        model._load(path, limits)
        return model

    def load_context(self, context):
        self._load(context.artifacts["saved_model"], {})

    def _load(self, path: str, limits: dict) -> None:
        loaded = tf.saved_model.load(path)
        self._serve = loaded.signatures["serving_default"]
        self.class_names = [name.decode() for name in loaded.signatures["class_names"]()["class_names"].numpy()]
        self.limits = {**LIMITS, **limits}

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = list(model_input["image"])
        if not images:
            raise bad_request("the request has no images; send one or more base64 images in column 'image'")
        if self.limits["max_images"] is not None and len(images) > self.limits["max_images"]:
            raise bad_request(f"{len(images)} images in one request, over the limit of {self.limits['max_images']}; "
                              "send them in smaller batches")
        data, pixels = zip(*(read_image(value, i, self.limits["max_pixels"]) for i, value in enumerate(images)))
        if self.limits["max_request_pixels"] is not None and sum(pixels) > self.limits["max_request_pixels"]:
            raise bad_request(f"the images of this request have {sum(pixels):,} pixels in all, over the limit of "
                              f"{self.limits['max_request_pixels']:,}; send them in smaller batches")
        try:
            out = self._serve(image_bytes=tf.constant(list(data), dtype=tf.string))
        except tf.errors.InvalidArgumentError as error:  # PIL read them all, so this is rare
            raise bad_request(f"TensorFlow could not decode the images: {error.message.strip().splitlines()[-1]}")
        rows = []
        for labels, names, scores in zip(out["labels"].numpy(), out["class_names"].numpy(), out["scores"].numpy()):
            top_k = [{"class_name": n.decode(), "label": int(l), "score": float(s)}
                     for l, n, s in zip(labels, names, scores)]
            rows.append({**top_k[0], "top_k": top_k})
        return pd.DataFrame(rows, columns=["class_name", "label", "score", "top_k"])


mlflow.models.set_model(FlowerClassifier())
