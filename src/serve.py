"""Serve: MLflow's scoring server for `models:/<name>@champion`, behind a request body limit.

The app is MLflow's own (`mlflow.pyfunc.scoring_server`, what `mlflow models serve --env-manager local` runs:
/invocations, /ping, /health, /version). `mlflow models serve` puts no limit on the request body, so the app
is wrapped in a small ASGI middleware that answers 413 past `serve.max_body_mb` (and 415 to a request without
a Content-Type, which MLflow's app answers with a 500). The model checks the rest: the number of images, their
size from the header, and that each one decodes (src/pyfunc_model.py). The middleware also answers GET / with
src/page.html, a page that sends photos to /invocations and shows their top k.

`serve.runtime=openvino|tflite` runs the OpenVINO or int8 TFLite model in the pyfunc model's place of its
SavedModel (src/runtimes.py): the same checks, errors and JSON. `serve.workers=N` starts N server processes on
one port, each with its own model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import requests
import tensorflow as tf
import uvicorn
from mlflow.pyfunc import scoring_server
from omegaconf import DictConfig, OmegaConf
from uvicorn.supervisors import Multiprocess

from src import register, runtimes
from src.config import UserError

PAGE = Path(__file__).with_name("page.html")  # GET /: try the model in a browser


def champion_uri(name: str) -> tuple[str, str]:
    """models:/<name>@champion, and which version and run that is now (the server keeps it until restarted)."""
    version = register.require_champion(mlflow.MlflowClient(), name)
    return f"models:/{name}@{register.CHAMPION}", f"version {version.version}, run {version.run_id}"


class RequestLimits:
    """ASGI middleware: reads the whole request body, up to `max_bytes`, before the app sees it, and refuses a
    POST without a Content-Type. GET / gets the page (MLflow's app has no /)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes, self.page = app, max_bytes, PAGE.read_bytes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/":
            return await self.respond(send, 200, b"text/html; charset=utf-8", self.page)
        headers = dict(scope["headers"])
        if scope["method"] == "POST" and b"content-type" not in headers:
            return await self.refuse(send, 415, "UNSUPPORTED_MEDIA_TYPE",
                                     "the request has no Content-Type; send Content-Type: application/json")
        declared = headers.get(b"content-length")
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
        await self.refuse(send, 413, "REQUEST_TOO_LARGE", f"the request body is {size:,} bytes, over the limit of "
                                                         f"{self.max_bytes:,}; send fewer or smaller images per request")

    @classmethod
    async def refuse(cls, send, status: int, code: str, message: str) -> None:
        content = json.dumps({"error_code": code, "message": message}).encode()
        await cls.respond(send, status, b"application/json", content)

    @staticmethod
    async def respond(send, status: int, content_type: bytes, content: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def build_app(model_uri: str, cfg: DictConfig, runtime_folder: Path | None = None) -> RequestLimits:
    """The app for `model_uri`; with `runtime_folder`, its `cfg.runtime` model from there in the SavedModel's
    place."""
    model = mlflow.pyfunc.load_model(model_uri)
    predictor = model.unwrap_python_model()
    predictor.limits.update({key: cfg[key] for key in ("max_images", "max_pixels", "max_request_pixels")})
    if runtime_folder is not None:
        runtimes.serve_with(predictor, cfg.runtime, runtime_folder, model.metadata.run_id, threads(cfg))
    return RequestLimits(scoring_server.init(model), int(cfg.max_body_mb * 2**20))


APP_ARGS = "FLOWERS_SERVE_APP"  # serve.workers > 1: how each worker process builds its app
WORKER_START_S = 300
BACKLOG = 2048  # uvicorn's default, which it sets again when it serves


def app_from_environment() -> RequestLimits:
    args = json.loads(os.environ[APP_ARGS])
    folder, cfg = args["runtime_folder"], OmegaConf.create(args["cfg"])
    use_threads(cfg)
    return build_app(args["model_uri"], cfg, Path(folder) if folder else None)


def threads(cfg: DictConfig) -> int | None:
    """Each worker's compute threads: serve.threads; else, with several workers, the cores this process may run
    on shared among them (N workers each on every core oversubscribe them); else None: each runtime's default."""
    if cfg.get("threads"):
        return cfg.threads
    return max(1, len(os.sched_getaffinity(0)) // cfg.workers) if cfg.workers > 1 else None


def use_threads(cfg: DictConfig) -> None:
    """TensorFlow's thread pools in this process (the SavedModel, and the decoding for the other runtimes) at
    `threads(cfg)`, if set; before TensorFlow runs its first op, which fixes them."""
    if (count := threads(cfg)) is not None:
        tf.config.threading.set_intra_op_parallelism_threads(count)
        tf.config.threading.set_inter_op_parallelism_threads(count)


def serve(model_uri: str, cfg: DictConfig, runtime_folder: Path | None = None,
          sock: socket.socket | None = None) -> None:
    """Serve on `sock` (default: listening_socket on cfg.host:cfg.port), in one process or cfg.workers, as
    uvicorn.run does (Ctrl-C stops it quietly) but on our socket."""
    if sock is None:
        sock = listening_socket(cfg.host, cfg.port)
    try:
        if cfg.workers == 1:
            app = build_app(model_uri, cfg, runtime_folder)
            uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info")).run(sockets=[sock])
        else:
            os.environ[APP_ARGS] = json.dumps({"model_uri": model_uri,
                                               "cfg": OmegaConf.to_container(cfg, resolve=True),
                                               "runtime_folder": str(runtime_folder) if runtime_folder else None})
            # A worker loads TensorFlow and the model before it answers uvicorn's health check (5 s by default).
            config = uvicorn.Config(f"{__name__}:app_from_environment", factory=True, workers=cfg.workers,
                                    host=cfg.host, port=cfg.port, log_level="info",
                                    timeout_worker_healthcheck=WORKER_START_S)
            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # uvicorn raises it again once it has shut down
        pass


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket (the workers share it), as uvicorn binds it but made with proto=IPPROTO_TCP, bound and
    listening before the model loads, so a taken port is a one-line error at once (with SO_REUSEADDR, a second
    server could bind a port that is bound but not yet listening). Connections that come while the model loads
    wait in the backlog. asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose socket says
    TCP, and uvicorn's own (proto 0) made every keep-alive request after the first wait about 40 ms for a delayed
    ACK: a 64 ms p50 at concurrency 1 with serve.workers=2 against 15 ms with one (uvicorn#3149)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); stop what uses it, or pick another "
                        "port: make serve-best PORT=9000") from None
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    """A loopback TCP port that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 180.0) -> bool:
    """Poll `url` until it answers 200 (True), or until the process exits or the time runs out (False)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy starting up
            time.sleep(0.5)
    return False
