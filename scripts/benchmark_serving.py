"""Benchmark the champion behind `make serve-best` against the same model in-process, and print the figures.

    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/benchmark_serving.py [--requests 200]
    ... scripts/benchmark_serving.py --runtimes savedmodel,openvino,tflite [--workers 2]
    TFDS_DATA_DIR=../shared/tensorflow_datasets .venv/bin/python scripts/benchmark_serving.py --load [--json]

For each of --runtimes (serve.runtime) it starts scripts/serve_best.py on a free loopback port, then, side by
side in this one run:
1. latency of one JPEG (a real test image): p50 and p99 over --requests calls, through HTTP and in-process;
2. throughput in images/s at concurrency 1 and 8 (threads, one image per request), and in-process one image at
   a time and eight per call (what micro-batching concurrent requests could gain at best);
3. request and response sizes against the article's: a 299x299x3 float array as JSON, and 102 scores back.
Machines differ and this one is shared, so read the ratios; the absolute times are for this run only.

--load instead sends --requests (2,000) at --concurrency 8, --bad-fraction of them one of the bad requests of
docs/serving.md, and checks that nothing gets a 5xx or a dropped connection, that each bad request gets its 4xx,
and that the server's memory (RSS, with its children) grows by under 10 % from request 200 to the end; it
exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAX_RSS_GROWTH = 0.10  # --load: the server's RSS from the first checkpoint to the last


def test_image() -> bytes:
    """The first image of the test split, as stored (JPEG)."""
    import tensorflow_datasets as tfds
    ds = tfds.load("oxford_flowers102", split="test", download=False, decoders={"image": tfds.decode.SkipDecoding()})
    return next(iter(ds))["image"].numpy()


def body(*images: bytes | str) -> bytes:
    """The request for these images (bytes, or text sent as it is)."""
    text = [image if isinstance(image, str) else base64.b64encode(image).decode() for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[t] for t in text]}}).encode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width=30000, height=30000) -> bytes:
    """A valid 1x1 PNG whose header declares width x height: a few dozen bytes."""
    data = png(Image.new("RGB", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return data[:8] + chunk + data[8 + 25:]


def bad_requests(image: bytes, limits) -> dict[str, tuple[bytes, dict, int]]:
    """The bad requests of docs/serving.md that HTTP can carry, for a server with these `limits` (conf/serve):
    kind -> (body, headers, the status it should get)."""
    side = math.isqrt(limits["max_request_pixels"] // 3) + 1  # 3 images over the request's limit, each within its own
    over = math.isqrt(limits["max_pixels"]) + 1
    bad = {
        "not an image": body(b"this is not an image"),
        "truncated image": body(image[:len(image) // 2]),
        "empty image": body(b""),
        "no images": body(),
        "invalid base64": body("!!not*base64"),
        "not JSON": b"{nope",
        "wrong JSON shape": json.dumps({"images": [base64.b64encode(image).decode()]}).encode(),
        "decompression bomb": body(bomb_png()),
        "too many pixels": body(bomb_png(over, over)),
        "too many images": body(*[image] * (limits["max_images"] + 1)),
        "too many pixels in all": body(*[png(Image.new("RGB", (side, side)))] * 3),
        "body too large": body(b"x" * int(limits["max_body_mb"] * 2**20)),
    }
    json_type = {"Content-Type": "application/json"}
    return {**{kind: (data, json_type, 413 if kind == "body too large" else 400) for kind, data in bad.items()},
            "no Content-Type": (body(image), {}, 415)}


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


_client = threading.local()


def session() -> requests.Session:
    """The calling thread's own keep-alive connection."""
    if not hasattr(_client, "session"):
        _client.session = requests.Session()
    return _client.session


def rss_mb(pid: int) -> float:
    """The resident memory of the process and its children, in MB."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def load(url: str, pid: int, image: bytes, limits, n_requests: int = 2000, concurrency: int = 8,
         bad_fraction: float = 0.1, seed: int = 0, rss_at: tuple[int, ...] = (200, 2000)) -> dict:
    """Send `n_requests` requests at `concurrency` to the server at `url` (process `pid`): one `image` each,
    but a `bad_fraction` of them, at seeded places, one of `bad_requests`, every kind in turn in a seeded order
    (so each kind is sent once there are as many bad requests as kinds). The server's RSS is read after each
    count of `rss_at`, the requests being sent in phases between them. Errors are 5xx answers, dropped
    connections, and good requests not answered 200."""
    rng = np.random.default_rng(seed)
    bad = bad_requests(image, limits)
    n_bad = round(n_requests * bad_fraction)
    kinds = [None] * n_requests
    for i, kind in zip(rng.choice(n_requests, n_bad, replace=False), rng.permutation(np.resize(list(bad), n_bad))):
        kinds[i] = str(kind)
    good = (body(image), {"Content-Type": "application/json"}, 200)

    def send(kind: str | None) -> tuple[str | None, int | str, float]:
        data, headers, _ = bad[kind] if kind else good
        start = time.perf_counter()
        try:
            status = session().post(f"{url}/invocations", data=data, headers=headers, timeout=120).status_code
        except requests.RequestException as error:
            status = type(error).__name__
        return kind, status, time.perf_counter() - start

    send(None)  # the first call builds TensorFlow's graph
    results, rss, elapsed = [], {}, 0.0
    with ThreadPoolExecutor(concurrency) as pool:
        for start, end in zip((0, *rss_at), rss_at):
            began = time.perf_counter()
            results += pool.map(send, kinds[start:end])
            elapsed += time.perf_counter() - began
            rss[end] = rss_mb(pid)
    errors = [(kind, status) for kind, status, _ in results
              if not isinstance(status, int) or status >= 500 or (kind is None and status != 200)]
    by_kind = {kind: {"status": expected, "sent": 0, "got it": 0} for kind, (_, _, expected) in bad.items()}
    for kind, status, _ in results:
        if kind:
            by_kind[kind]["sent"] += 1
            by_kind[kind]["got it"] += status == bad[kind][2]
    p50, p99 = percentiles([seconds for kind, _, seconds in results if kind is None])
    growth = rss[rss_at[-1]] / rss[rss_at[0]] - 1
    return {"requests": len(results), "concurrency": concurrency, "bad": n_bad, "errors": len(errors),
            "error_examples": [f"{kind or 'good'}: {status}" for kind, status in errors[:5]], "bad_by_kind": by_kind,
            "p50_ms": p50, "p99_ms": p99, "img_per_s": (len(results) - n_bad) / elapsed,
            "rss_mb": {str(n): mb for n, mb in rss.items()}, "rss_growth": growth, "rss_pass": growth < MAX_RSS_GROWTH}


def passed(report: dict) -> bool:
    return (report["errors"] == 0 and report["rss_pass"]
            and all(k["got it"] == k["sent"] for k in report["bad_by_kind"].values()))


def start_server(model_uri: str | None, *overrides: str) -> tuple[subprocess.Popen, str]:
    from src.serve import free_port, wait_until_up
    port = free_port()
    command = [sys.executable, "scripts/serve_best.py", f"serve.port={port}", *overrides]
    if model_uri:
        command[2:2] = ["--model-uri", model_uri]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    if wait_until_up(f"{url}/ping", server, timeout=300):
        return server, url
    server.kill()
    sys.exit(f"error: the server did not answer /ping within 5 minutes: {server.communicate()[1][-2000:]}")


def print_load(report: dict, model_uri: str, as_json: bool) -> None:
    print(f"model {model_uri}; {report['requests']:,} requests at concurrency {report['concurrency']}, "
          f"{report['bad']} of them bad; {os.cpu_count()} CPU cores")
    print()
    print(pd.DataFrame([{"bad request": kind, **k} for kind, k in report["bad_by_kind"].items()])
          .to_markdown(index=False))
    print()
    print(f"errors (5xx, dropped connections, good requests not answered 200): {report['errors']}"
          + "".join(f"\n  {e}" for e in report["error_examples"]))
    print(f"good requests: p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, "
          f"{report['img_per_s']:.1f} img/s")
    rss = list(report["rss_mb"].items())
    (first, rss_first), (last, rss_last) = rss[0], rss[-1]
    print(f"server RSS: {rss_first:.1f} MB after {int(first):,} requests, {rss_last:.1f} MB after {int(last):,}: "
          f"growth {report['rss_growth']:+.1%} (limit {MAX_RSS_GROWTH:.0%}): "
          f"{'PASS' if report['rss_pass'] else 'FAIL'}")
    if as_json:
        print(json.dumps(report))


def in_process_model(model_uri: str, runtime: str, folder: Path | None):
    """The pyfunc model as the server runs it with `runtime`."""
    import mlflow
    from src import runtimes
    model = mlflow.pyfunc.load_model(model_uri)
    if folder is not None:
        runtimes.serve_with(model.unwrap_python_model(), runtime, folder, model.metadata.run_id)
    return model


def measure(model_uri: str, explicit: bool, runtime: str, folder: Path | None, image: bytes, n: int,
            server_args: list[str]) -> dict:
    """One runtime's figures: HTTP and in-process latency and throughput, side by side. `explicit`: the server
    is told `model_uri` (else it serves the champion, which `model_uri` names)."""
    model = in_process_model(model_uri, runtime, folder)
    one, eight = pd.DataFrame({"image": [image]}), pd.DataFrame({"image": [image] * 8})
    server, url = start_server(model_uri if explicit else None, f"serve.runtime={runtime}", *server_args)
    payload = body(image)

    def over_http():
        response = session().post(f"{url}/invocations", data=payload, headers={"Content-Type": "application/json"})
        response.raise_for_status()
        return response

    try:
        response = over_http()
        for _ in range(10):  # warm up both
            over_http(), model.predict(one), model.predict(eight)
        http_p50, http_p99 = percentiles(time_calls(over_http, n))
        local_p50, local_p99 = percentiles(time_calls(lambda: model.predict(one), n))
        figures = {"runtime": runtime, "HTTP p50 ms": http_p50, "HTTP p99 ms": http_p99,
                   "HTTP img/s c=1": throughput(over_http, n, 1), "HTTP img/s c=8": throughput(over_http, n, 8),
                   "in-process p50 ms": local_p50, "in-process p99 ms": local_p99,
                   "in-process img/s": throughput(lambda: model.predict(one), n, 1),
                   "in-process img/s, 8 per call": 8 * throughput(lambda: model.predict(eight), n // 8, 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    top = response.json()["predictions"][0]
    return {**figures, "top-1": f"{top['class_name']} ({top['score']:.3f})", "_response": response}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, help="calls per measurement (200); with --load, in all (2000)")
    parser.add_argument("--model-uri", help="default: models:/<registry.model_name>@champion")
    parser.add_argument("--runtimes", default="savedmodel",
                        help="comma-separated serve.runtime values to measure in turn, e.g. savedmodel,openvino,tflite")
    parser.add_argument("--workers", type=int, default=1, help="serve.workers of each server")
    parser.add_argument("--threads", type=int, help="serve.threads of each server (default: the cores shared among "
                                                    "its workers); the in-process model keeps its runtime's default")
    parser.add_argument("--load", action="store_true", help="the load and memory test instead (of the first runtime)")
    parser.add_argument("--concurrency", type=int, default=8, help="--load: client threads")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="--load: the share of bad requests")
    parser.add_argument("--seed", type=int, default=0, help="--load: which requests are bad, and of which kind")
    parser.add_argument("--rss-first", type=int, default=200,
                        help="--load: read the server's RSS after this many requests, and after all of them")
    parser.add_argument("--json", action="store_true", help="--load: also print the report as one JSON line")
    args = parser.parse_args()

    import mlflow
    from src import runtimes
    from src.config import RUNTIMES, load_config
    cfg = load_config()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model_uri = args.model_uri or f"models:/{cfg.registry.model_name}@champion"
    names = args.runtimes.split(",")
    unknown = set(names) - set(RUNTIMES)
    if unknown:
        sys.exit(f"error: --runtimes has {', '.join(sorted(unknown))}; use {', '.join(RUNTIMES)}")
    folders = {name: None if name == "savedmodel" else runtimes.runtime_model(
        mlflow.MlflowClient(), name, args.model_uri, cfg.registry.model_name, Path(cfg.paths.runtimes_dir))[1]
        for name in names}  # made now when missing, not while a server starts
    image = test_image()
    server_args = [f"serve.workers={args.workers}",
                   *([f"serve.threads={args.threads}"] if args.threads is not None else [])]
    server_setup = f"{args.workers} worker(s), {args.threads if args.threads is not None else 'default'} threads each"
    if args.load:
        n_requests = args.requests or 2000
        server, url = start_server(args.model_uri, f"serve.runtime={names[0]}", *server_args)
        try:
            report = load(url, server.pid, image, cfg.serve, n_requests, args.concurrency, args.bad_fraction,
                          args.seed, (args.rss_first, n_requests))
        finally:
            server.terminate()
            server.wait(timeout=60)
        print_load(report, f"{model_uri} ({names[0]}, {server_setup})", args.json)
        return 0 if passed(report) else 1
    n = args.requests or 200
    rows = [measure(model_uri, bool(args.model_uri), name, folders[name], image, n, server_args) for name in names]
    response = rows[0]["_response"]
    tops = {row["runtime"]: row.pop("top-1") for row in rows}
    table = pd.DataFrame([{k: v for k, v in row.items() if k != "_response"} for row in rows]).set_index("runtime")
    table["HTTP c=8 / in-process"] = table["HTTP img/s c=8"] / table["in-process img/s"]
    if "savedmodel" in names:
        table["HTTP c=8 / savedmodel's"] = table["HTTP img/s c=8"] / table.loc["savedmodel", "HTTP img/s c=8"]
    print(f"model {model_uri}; one {len(image):,}-byte test JPEG; {n} calls per figure; {server_setup}; "
          f"{os.cpu_count()} CPU cores")
    print("top-1 of the image: " + "; ".join(f"{name} {top}" for name, top in tops.items()))
    print()
    print(table.T.to_markdown(floatfmt=".2f"))
    print()
    article_request, article_response = article_sizes(image)
    print(pd.DataFrame([
        {"": "request", "this model (base64 JPEG)": len(body(image)), "article (299x299x3 floats)": article_request,
         "ratio": article_request / len(body(image))},
        {"": "response", "this model (base64 JPEG)": len(response.content), "article (299x299x3 floats)":
            article_response, "ratio": article_response / len(response.content)},
    ]).to_markdown(index=False, floatfmt=",.1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
