"""Screenshot of `make ui` on a throw-away demo store: an experiment of the project, open on its training runs.

    make install-all                             # playwright, in the dev extra; no browser download:
    make browser                                 # it drives the system's Chromium (apt-get install -y chromium)
    .venv/bin/python scripts/screenshot_ui.py [--out docs/images/mlflow_ui_runs.png] [--chromium /usr/bin/chromium]

It makes a demo MLflow store in a temporary folder: one experiment created by src/track.py, as train.py creates
one (with its `mlflow.experimentKind` tag), and two demo runs with a param and a few metrics logged by hand (no
training; the runs are tagged demo=true and their numbers mean nothing). It starts `make ui` on a free port
against that store, opens the experiment's page in headless Chromium, waits until the runs are listed (so it
fails if the page lands elsewhere), and saves a PNG of at most 300 kB. The store is deleted at the end.

MLflow 3.17's UI opens an experiment on the view of its sidebar switch "GenAI / Model training", which a new
browser sets to GenAI (an overview of traces); it does not read the experiment's `mlflow.experimentKind` tag for
this (mlflow/mlflow#24498). So the page is opened as a newcomer should open it: by the link that `make ui`
prints for the experiment, with `?workflowType=machine_learning` (the same as setting the switch to Model training,
which the browser then remembers). `--workflow-type none` opens the plain link, and fails on MLflow 3.17.2: it
lands on the GenAI overview.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from PIL import Image

from src import track
from src.config import PROJECT_ROOT, load_config
from src.serve import free_port, wait_until_up

EXPERIMENT = "demo-store-no-training"
# Two demo runs: (name, params, metrics). Not results of this project: nothing was trained.
RUNS = [("demo-run-a", {"backbone.name": "demo_backbone_a", "lr": 0.001}, {"val/accuracy_best": 0.5,
                                                                           "test/accuracy": 0.5}),
        ("demo-run-b", {"backbone.name": "demo_backbone_b", "lr": 0.01}, {"val/accuracy_best": 0.6,
                                                                          "test/accuracy": 0.6})]
MAX_BYTES = 300_000


def demo_store(folder: Path) -> tuple[str, str]:
    """A store in `folder` with the demo experiment and its runs; returns its URI and the experiment id."""
    uri = f"sqlite:///{folder}/mlflow.db"
    cfg = load_config(f"tracking.uri={uri}", f"tracking.experiment_name={EXPERIMENT}",
                      f"tracking.artifact_location={folder}/mlartifacts").tracking
    experiment_id = track.setup(cfg)
    for name, params, metrics in RUNS:
        with mlflow.start_run(run_name=name, tags={"demo": "true"}):
            mlflow.log_params(params)
            for step in (1, 2, 3):  # a short curve, so the run has per-epoch values like a training run
                mlflow.log_metric("val/accuracy", metrics["val/accuracy_best"] * step / 3, step=step)
            mlflow.log_metrics(metrics)
    mlflow.set_tracking_uri(None)
    return uri, experiment_id


def stop_group(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop the process's group (make, mlflow and its workers) and wait until all of it has ended."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)


def screenshot(url: str, run_names: list[str], chromium: str | None, width: int, height: int) -> bytes:
    """The page at `url` once every run name is shown, as PNG bytes."""
    from playwright.sync_api import sync_playwright  # the dev extra (make install-all)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url, wait_until="domcontentloaded", timeout=120_000)  # the run names below show it loaded
        for name in run_names:  # fails (times out) when the page opens on another view than the runs
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        close = page.get_by_role("button", name="Close")  # MLflow's assistant panel, open on a first visit
        if close.count() == 1:
            close.click()
        page.wait_for_timeout(3000)  # the table's last columns and icons; the UI polls, so the network never idles
        print(f"the page landed on {page.url}")
        png = page.screenshot()
        browser.close()
    return png


def shrink(png: bytes, max_bytes: int = MAX_BYTES) -> bytes:
    """The PNG, re-encoded (then in 256 colours, then smaller) until it fits in `max_bytes`."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        for candidate in (image, image.quantize(256)):
            out = io.BytesIO()
            candidate.save(out, format="PNG", optimize=True)
            if out.tell() <= max_bytes:
                return out.getvalue()
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "images" / "mlflow_ui_runs.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the browser to drive (default: the system's chromium)")
    parser.add_argument("--size", default="1400x700", help="the browser window, WIDTHxHEIGHT")
    parser.add_argument("--workflow-type", choices=["machine_learning", "none"], default="machine_learning",
                        help="machine_learning: make ui's link to the training runs; none: the plain link")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="flowers-demo-store-") as tmp, open(Path(tmp) / "ui.log", "w+") as log:
        uri, experiment_id = demo_store(Path(tmp))
        port = free_port()
        # In a session of its own, so that stopping its group stops mlflow's workers too.
        process = subprocess.Popen(["make", "--no-print-directory", "ui", f"UI_PORT={port}"], cwd=PROJECT_ROOT,
                                   env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not wait_until_up(f"http://127.0.0.1:{port}/health", process):
                raise RuntimeError(f"make ui did not come up on port {port}")
            url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"
            if args.workflow_type == "machine_learning":
                log.seek(0)
                url = re.search(rf"^the training runs of {EXPERIMENT}: (\S+)$", log.read(), re.M).group(1)
            png = screenshot(url, [name for name, _, _ in RUNS], args.chromium, width, height)
        except Exception:
            log.seek(0)
            print(f"make ui's output, the end:\n{log.read()[-3000:]}", file=sys.stderr)
            raise
        finally:
            stop_group(process)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(shrink(png))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
