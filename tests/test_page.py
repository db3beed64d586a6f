"""GET / on `make serve-best`: the page that tries the model, driven in headless Chromium against the real server."""

import os
import shutil
import sys

import pytest
import requests

from src.serve import free_port
from tests.helpers import JPEG, running
from tests.test_serve import b64, invoke, split

CHROMIUM = shutil.which("chromium")
NOT_AN_IMAGE = b"this is not an image"


@pytest.fixture(scope="module")
def champion_classes():
    """Six classes and the top 5, as the page shows for a real model (conf/export: top_k 5)."""
    return ["daisy", "rose", "tulip", "lily", "iris", "poppy"], 5


@pytest.fixture(scope="module")
def server(champion_store):
    port = free_port()
    with running([sys.executable, "scripts/serve_best.py", f"serve.port={port}"], port,
                 {**os.environ, "MLFLOW_TRACKING_URI": champion_store[0]}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: make install-all installs it")
    if CHROMIUM is None:
        pytest.skip("no chromium for Playwright to drive: make browser, or apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.goto(f"{server}/")
    yield page
    page.close()


def test_get_root_is_the_self_contained_page_and_the_rest_is_mlflows(server):
    response = requests.get(f"{server}/", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'type="file"' in response.text and "http" not in response.text  # nothing to fetch from elsewhere
    assert requests.post(f"{server}/", json={}, timeout=30).status_code == 404  # only GET / is the page's
    assert requests.get(f"{server}/ping", timeout=30).status_code == 200
    assert len(invoke(server, split(b64(JPEG))).json()["predictions"][0]["top_k"]) == 5


def shown(card) -> list[tuple[str, str, float]]:
    """A result's rows: (class name, score as shown, bar width in %)."""
    card.locator(".row").nth(4).wait_for(timeout=60_000)
    return [(row.locator(".name").text_content(), row.locator(".score").text_content(),
             float(row.locator(".bar").evaluate("bar => bar.style.width").rstrip("%")))
            for row in card.locator(".row").all()]


def test_a_chosen_photo_gets_the_servers_top_5_as_bars(server, page, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(JPEG)
    page.set_input_files("#files", tmp_path / "photo.jpg")
    card = page.locator(".result")
    rows = shown(card)
    top_k = invoke(server, split(b64(JPEG))).json()["predictions"][0]["top_k"]
    assert [name for name, _, _ in rows] == [t["class_name"] for t in top_k]
    assert [score for _, score, _ in rows] == [f"{t['score']:.3f}" for t in top_k]
    assert [width for _, _, width in rows] == pytest.approx([100 * t["score"] for t in top_k], abs=0.06)
    assert card.locator(".file").text_content() == "photo.jpg"
    assert card.locator("img").evaluate("image => image.complete && image.naturalWidth") == 160  # the thumbnail


def test_dropped_files_get_a_result_each_and_a_bad_file_the_servers_message(server, page):
    files = page.evaluate_handle("""files => {
        const transfer = new DataTransfer();
        for (const [name, bytes] of files) transfer.items.add(new File([new Uint8Array(bytes)], name));
        return transfer;
    }""", [["notes.jpg", list(NOT_AN_IMAGE)], ["photo.jpg", list(JPEG)]])
    page.dispatch_event("#drop", "drop", {"dataTransfer": files})
    bad, good = page.locator(".result").all()
    error = bad.locator(".error")
    error.wait_for(timeout=60_000)
    response = invoke(server, split(b64(NOT_AN_IMAGE)))
    assert response.status_code == 400 and error.text_content() in response.json()["message"]
    assert "image 0 is not an image" in error.text_content() and "Failed to predict" not in error.text_content()
    assert bad.locator(".row").count() == 0 and len(shown(good)) == 5
