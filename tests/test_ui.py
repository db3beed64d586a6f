"""`make ui`: the MLflow UI on loopback against the project's store, with the runs, their plots and the registry."""

import os
import shutil

import mlflow
import pytest
import requests

from scripts import screenshot_ui
from src.serve import free_port
from tests.helpers import running


def test_make_ui_serves_the_store_runs_artifacts_and_champion(tracking_uri, tmp_path):
    mlflow.set_experiment("flowers102")
    (tmp_path / "curves.png").write_bytes(b"\x89PNG fake")
    with mlflow.start_run(run_name="mobilenet_v2_100_224-lr0.001-bs32") as run:
        mlflow.log_metric("val/accuracy_best", 0.86)
        mlflow.log_artifact(str(tmp_path / "curves.png"), "plots")
    port = free_port()
    with running(["make", "ui", f"UI_PORT={port}"], port, {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                 ready="/health") as url:
        assert "<html" in requests.get(url, timeout=30).text.lower()
        found = requests.post(f"{url}/api/2.0/mlflow/runs/search", timeout=30,
                              json={"experiment_ids": [run.info.experiment_id]}).json()["runs"]
        assert [r["info"]["run_name"] for r in found] == ["mobilenet_v2_100_224-lr0.001-bs32"]
        artifact = requests.get(f"{url}/get-artifact", params={"path": "plots/curves.png",
                                                              "run_uuid": run.info.run_id}, timeout=30)
        assert artifact.status_code == 200 and artifact.content == b"\x89PNG fake"


def test_the_link_make_ui_prints_opens_the_experiment_on_its_training_runs_in_chromium(tmp_path):
    pytest.importorskip("playwright.sync_api", reason="no playwright: make install-all installs it")
    if shutil.which("chromium") is None:
        pytest.skip("no chromium for Playwright to drive: make browser, or apt-get install -y chromium")
    # It waits until the demo runs' names are on the page, and raises where the link lands elsewhere (the plain link
    # lands on the GenAI overview: --workflow-type none).
    assert screenshot_ui.main(["--out", str(tmp_path / "ui.png")]) == 0
    assert (tmp_path / "ui.png").stat().st_size > 10_000
