"""`scripts/benchmark_serving.py --load`, short: the real server on a tiny champion, good and bad requests at once."""

import os
import sys

import psutil
import pytest

from scripts.benchmark_serving import load, passed
from src.serve import free_port
from tests.helpers import JPEG, running

# Small limits, so that the bad requests are small too: a 1 MB body, 4 images, 1 megapixel in all.
LIMITS = {"max_images": 4, "max_body_mb": 1, "max_pixels": 50_000_000, "max_request_pixels": 1_000_000}


@pytest.fixture(scope="module")
def server(champion_store):
    port = free_port()
    with running([sys.executable, "scripts/serve_best.py", f"serve.port={port}",
                  *(f"serve.{key}={value}" for key, value in LIMITS.items())],
                 port, {**os.environ, "MLFLOW_TRACKING_URI": champion_store[0]}) as url:
        pid = next(p.pid for p in psutil.Process().children() if "scripts/serve_best.py" in p.cmdline())
        yield url, pid


def test_load_with_bad_requests_gets_no_errors_and_each_bad_kind_its_4xx(server):
    report = load(*server, JPEG, LIMITS, n_requests=200, concurrency=4, seed=1, rss_at=(40, 200))
    assert report["requests"] == 200 and report["bad"] == 20
    assert report["errors"] == 0, report["error_examples"]
    assert all(k["sent"] >= 1 and k["got it"] == k["sent"] for k in report["bad_by_kind"].values()), \
        report["bad_by_kind"]
    assert len(report["bad_by_kind"]) == 13 and report["bad_by_kind"]["no Content-Type"]["status"] == 415
    assert report["p50_ms"] <= report["p99_ms"] and report["img_per_s"] > 0
    # The RSS figures, not the 10 % threshold: 40 requests in, the server is still warming up (its threads, the
    # allocator), so 200 requests cannot tell a leak from that (one run here: 1,001 to 1,011 MB, +1 %), and a
    # threshold there would fail or pass by chance on a loaded machine; the 2,000-request run checks it.
    assert set(report["rss_mb"]) == {"40", "200"} and all(mb > 0 for mb in report["rss_mb"].values())
    assert passed(report) == report["rss_pass"]
