"""Benchmark the champion behind `make serve-best` against the same model in-process, and print the figures.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/benchmark_serving.py [--requests 200]

It starts scripts/serve_best.py on a free loopback port, then, side by side in this one run:
1. latency of one JPEG (a real test image): p50 and p99 over --requests calls, through HTTP and in-process;
2. throughput in images/s at concurrency 1 and 8 (threads, one image per request), and in-process;
3. request and response sizes against the article's: a 299x299x3 float array as JSON, and 102 scores back.
Machines differ and this one is shared, so read the ratios; the absolute times are for this run only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

ROOT = Path(__file__).resolve().parents[1]


def test_image() -> bytes:
    """The first image of the test split, as stored (JPEG)."""
    import tensorflow_datasets as tfds
    ds = tfds.load("oxford_flowers102", split="test", download=False, decoders={"image": tfds.decode.SkipDecoding()})
    return next(iter(ds))["image"].numpy()


def body(image: bytes) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(image).decode()]]}}).encode()


def article_sizes(image: bytes) -> tuple[int, int]:
    """The article's request (the image resized to 299x299, scaled to [0, 1], as a nested JSON float array) and
    its response (102 softmax scores), in bytes."""
    import tensorflow as tf
    pixels = tf.image.resize(tf.io.decode_jpeg(image), (299, 299)).numpy() / 255.0
    request = json.dumps({"instances": [pixels.tolist()]})
    scores = np.random.default_rng(0).dirichlet(np.ones(102)).tolist()
    return len(request), len(json.dumps({"predictions": [scores]}))


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_calls(call, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def throughput(call, n: int, concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: call(), range(n)))
    return n / (time.perf_counter() - start)


def start_server(model_uri: str | None) -> tuple[subprocess.Popen, str]:
    from src.serve import free_port, wait_until_up
    port = free_port()
    command = [sys.executable, "scripts/serve_best.py", f"serve.port={port}"]
    if model_uri:
        command[2:2] = ["--model-uri", model_uri]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    if wait_until_up(f"{url}/ping", server, timeout=300):
        return server, url
    server.kill()
    sys.exit(f"error: the server did not answer /ping within 5 minutes: {server.communicate()[1][-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="calls per measurement")
    parser.add_argument("--model-uri", help="default: models:/<registry.model_name>@champion")
    args = parser.parse_args()

    import mlflow
    from src.config import load_config
    cfg = load_config()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model_uri = args.model_uri or f"models:/{cfg.registry.model_name}@champion"
    image = test_image()
    payload = body(image)
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [image]})
    server, url = start_server(args.model_uri)
    local = threading.local()  # one keep-alive connection per client thread

    def over_http():
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(f"{url}/invocations", data=payload, headers={"Content-Type": "application/json"})
        response.raise_for_status()
        return response

    def in_process():
        return model.predict(frame)

    try:
        response = over_http()
        for _ in range(10):  # warm up both
            over_http(), in_process()
        http_p50, http_p99 = percentiles(time_calls(over_http, args.requests))
        local_p50, local_p99 = percentiles(time_calls(in_process, args.requests))
        http_c1 = throughput(over_http, args.requests, 1)
        http_c8 = throughput(over_http, args.requests, 8)
        local_c1 = throughput(in_process, args.requests, 1)
    finally:
        server.terminate()
        server.wait(timeout=30)

    article_request, article_response = article_sizes(image)
    top = response.json()["predictions"][0]
    print(f"model {model_uri}; one {len(image):,}-byte test JPEG; {args.requests} calls per figure; "
          f"{os.cpu_count()} CPU cores; top-1 {top['class_name']!r} ({top['score']:.3f})")
    print()
    print(pd.DataFrame([
        {"path": "HTTP (make serve-best)", "p50 ms": http_p50, "p99 ms": http_p99, "img/s c=1": http_c1,
         "img/s c=8": http_c8},
        {"path": "in-process pyfunc", "p50 ms": local_p50, "p99 ms": local_p99, "img/s c=1": local_c1,
         "img/s c=8": float("nan")},
    ]).to_markdown(index=False, floatfmt=".1f"))
    print()
    print(f"HTTP / in-process p50 latency: {http_p50 / local_p50:.2f}x; "
          f"HTTP throughput at concurrency 8 / 1: {http_c8 / http_c1:.2f}x")
    print()
    print(pd.DataFrame([
        {"": "request", "this model (base64 JPEG)": len(payload), "article (299x299x3 floats)": article_request,
         "ratio": article_request / len(payload)},
        {"": "response", "this model (base64 JPEG)": len(response.content), "article (299x299x3 floats)":
            article_response, "ratio": article_response / len(response.content)},
    ]).to_markdown(index=False, floatfmt=",.1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
