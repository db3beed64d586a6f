"""The MLflow pyfunc model, logged as code: a thin wrapper around the exported SavedModel."""

from __future__ import annotations

import mlflow
import pandas as pd
import tensorflow as tf


class FlowerClassifier(mlflow.pyfunc.PythonModel):
    """DataFrame with column `image` (encoded JPEG/PNG bytes) -> one row per image."""

    @classmethod
    def from_saved_model(cls, path: str) -> "FlowerClassifier":
        model = cls()
        model._serve = tf.saved_model.load(path).signatures["serving_default"]
        return model

    def load_context(self, context):
        self._serve = tf.saved_model.load(context.artifacts["saved_model"]).signatures["serving_default"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        out = self._serve(image_bytes=tf.constant(list(model_input["image"]), dtype=tf.string))
        rows = []
        for labels, names, scores in zip(out["labels"].numpy(), out["class_names"].numpy(), out["scores"].numpy()):
            top_k = [{"class_name": n.decode(), "label": int(l), "score": float(s)}
                     for l, n, s in zip(labels, names, scores)]
            rows.append({**top_k[0], "top_k": top_k})
        return pd.DataFrame(rows, columns=["class_name", "label", "score", "top_k"])


mlflow.models.set_model(FlowerClassifier())
