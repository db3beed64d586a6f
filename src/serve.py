"""Serve: MLflow's scoring server for `models:/<name>@champion`, behind a request body limit.

The app is MLflow's own (`mlflow.pyfunc.scoring_server`, what `mlflow models serve --env-manager local` runs:
/invocations, /ping, /health, /version). `mlflow models serve` puts no limit on the request body, so the app
is wrapped in a small ASGI middleware that answers 413 past `serve.max_body_mb`. The model checks the rest:
the number of images, their size from the header, and that each one decodes (src/pyfunc_model.py).
"""

from __future__ import annotations

import json

import mlflow
import uvicorn
from mlflow.pyfunc import scoring_server
from omegaconf import DictConfig

from src import register
from src.config import UserError


def champion_uri(name: str) -> str:
    if register.champion(mlflow.MlflowClient(), name) is None:
        raise UserError(f"model '{name}' has no {register.CHAMPION} in {mlflow.get_tracking_uri()}; "
                        "train, then run make register-best")
    return f"models:/{name}@{register.CHAMPION}"


class BodyLimit:
    """ASGI middleware: reads the whole request body, up to `max_bytes`, before the app sees it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(send, int(declared))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.too_large(send, len(body))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, replay, send)

    async def too_large(self, send, size: int) -> None:
        message = (f"the request body is {size:,} bytes, over the limit of {self.max_bytes:,}; "
                   "send fewer or smaller images per request")
        content = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def build_app(model_uri: str, cfg: DictConfig) -> BodyLimit:
    model = mlflow.pyfunc.load_model(model_uri, model_config={"max_images": cfg.max_images,
                                                              "max_pixels": cfg.max_pixels})
    return BodyLimit(scoring_server.init(model), int(cfg.max_body_mb * 2**20))


def serve(model_uri: str, cfg: DictConfig) -> None:
    uvicorn.run(build_app(model_uri, cfg), host=cfg.host, port=cfg.port, log_level="info")
