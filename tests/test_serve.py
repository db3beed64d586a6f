"""`make serve-best` end to end: a registered champion, the real server on loopback, real HTTP requests."""

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests
from omegaconf import OmegaConf
from PIL import Image

from scripts.benchmark_serving import bomb_png
from src import serve
from src.config import PROJECT_ROOT, UserError
from src.pyfunc_model import FlowerClassifier
from src.serve import free_port, listening_socket, threads
from tests.helpers import CLASSES, JPEG, PHOTO, encode, running

MAX_IMAGES, MAX_BODY_MB = 4, 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def split(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}


@pytest.fixture(scope="module")
def server(champion_store):
    port = free_port()
    with running([sys.executable, "scripts/serve_best.py", f"serve.port={port}", f"serve.max_images={MAX_IMAGES}",
                  f"serve.max_body_mb={MAX_BODY_MB}"], port, {**os.environ, "MLFLOW_TRACKING_URI": champion_store[0]}) as url:
        yield url


def invoke(url, body, **kwargs):
    data = json.dumps(body) if isinstance(body, dict) else body
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"},
                         timeout=60, **kwargs)


def test_ping_and_health_answer(server):
    assert requests.get(f"{server}/ping").status_code == 200
    assert requests.get(f"{server}/health").status_code == 200


def test_images_of_every_mode_and_size_get_their_top_k_as_in_process(server, champion_store):
    images = [JPEG, encode(PHOTO, "PNG"), encode(PHOTO.convert("L"), "JPEG"), encode(PHOTO.convert("RGBA"), "PNG")]
    more = [encode(PHOTO.convert("CMYK"), "JPEG"), encode(Image.new("RGB", (4000, 3000), "seagreen"), "JPEG"),
            encode(Image.new("RGB", (1, 1), "red"), "PNG"), encode(PHOTO.convert("P"), "PNG")]
    predictions = [p for batch in (images, more)
                   for p in invoke(server, split(*map(b64, batch))).json()["predictions"]]
    assert len(predictions) == 8
    expected = FlowerClassifier.from_saved_model(str(champion_store[1])).predict(
        None, __import__("pandas").DataFrame({"image": images + more}))
    for got, want in zip(predictions, expected.itertuples()):
        assert [t["class_name"] for t in got["top_k"]] == [t["class_name"] for t in want.top_k]
        assert [t["label"] for t in got["top_k"]] == [CLASSES.index(t["class_name"]) for t in got["top_k"]]
        np.testing.assert_allclose([t["score"] for t in got["top_k"]], [t["score"] for t in want.top_k], rtol=1e-5)
        assert len(got["top_k"]) == 3 and got["class_name"] == got["top_k"][0]["class_name"]


def test_records_instances_and_inputs_formats_and_wrapped_or_url_safe_base64_are_accepted(server):
    wrapped = "\n".join(b64(JPEG)[i:i + 76] for i in range(0, len(b64(JPEG)), 76))  # what `base64 file` prints
    url_safe = base64.urlsafe_b64encode(JPEG).decode()
    assert "-" in url_safe or "_" in url_safe
    bodies = [split(b64(JPEG)), {"dataframe_records": [{"image": b64(JPEG)}]}, {"instances": [{"image": b64(JPEG)}]},
              {"inputs": {"image": [b64(JPEG)]}}, {"inputs": {"image": [wrapped]}}, {"inputs": {"image": [url_safe]}}]
    labels = [invoke(server, body).json()["predictions"][0]["label"] for body in bodies]
    assert len(labels) == 6 and len(set(labels)) == 1


def test_a_phone_jpeg_with_extra_images_is_read_as_jpeg(server):
    buffer = io.BytesIO()
    PHOTO.save(buffer, "MPO", save_all=True, append_images=[PHOTO.convert("L").convert("RGB")])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    mpo, jpeg = (invoke(server, split(b64(b))).json()["predictions"][0] for b in (buffer.getvalue(), JPEG))
    assert mpo["label"] == jpeg["label"] and mpo["score"] == pytest.approx(jpeg["score"], rel=1e-5)


BAD = {
    "non-image bytes": (split(b64(b"this is not an image")), 400, "image 0 is not an image"),
    "truncated JPEG": (split(b64(JPEG), b64(JPEG[:len(JPEG) // 2])), 400, "image 1 is truncated or corrupt"),
    "empty image": (split(""), 400, "image 0 is empty"),
    "empty body": (b"", 400, "valid JSON"),
    "no images": (split(), 400, "the request has no images"),
    "invalid base64": (split("!!not*base64"), 400, "Invalid base64"),
    # `inputs` reach the model as bytes: bytes that fail to decode as base64 are read as the file itself
    "invalid base64 in inputs": ({"inputs": {"image": ["QUJDR"]}}, 400, "image 0 is not an image"),
    "wrong JSON shape": ({"images": [b64(JPEG)]}, 400, "exactly one of the input fields"),
    "wrong column": ({"dataframe_split": {"columns": ["photo"], "data": [[b64(JPEG)]]}}, 400,
                     "Model is missing inputs ['image']"),
    "not JSON": (b"{nope", 400, "valid JSON"),
    "decompression bomb": (split(b64(bomb_png())), 400, "pixels, over the limit of 50,000,000"),
    "100-megapixel header": (split(b64(bomb_png(10000, 10000))), 400, "declares 10000x10000 pixels, over the limit"),
    "too many images": (split(*[b64(JPEG)] * (MAX_IMAGES + 1)), 400, f"over the limit of {MAX_IMAGES}"),
    "TIFF": (split(b64(encode(PHOTO, "TIFF"))), 400, "image 0 is TIFF"),
    "too many pixels in all": (split(*[b64(encode(Image.new("RGB", (6000, 5000)), "PNG"))] * 4), 400,
                               "120,000,000 pixels in all, over the limit of 100,000,000"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_with_a_clear_message_and_the_server_keeps_serving(server, case):
    body, status, message = BAD[case]
    response = invoke(server, body)
    assert response.status_code == status, response.text[:500]
    assert message in response.json()["message"]
    assert invoke(server, split(b64(JPEG))).status_code == 200


def test_a_post_without_content_type_gets_415_not_a_server_error(server):
    response = requests.post(f"{server}/invocations", data=json.dumps(split(b64(JPEG))), timeout=60)
    assert response.status_code == 415 and "send Content-Type: application/json" in response.json()["message"]
    assert invoke(server, split(b64(JPEG))).status_code == 200


def test_a_body_over_the_limit_gets_413_whether_declared_or_streamed(server):
    too_big = json.dumps(split(b64(b"x" * (MAX_BODY_MB * 2**20)))).encode()
    response = invoke(server, too_big)
    assert response.status_code == 413 and "over the limit of 1,048,576" in response.json()["message"]
    chunked = invoke(server, iter([too_big[i:i + 65536] for i in range(0, len(too_big), 65536)]))
    assert chunked.status_code == 413  # no Content-Length: counted while reading
    assert invoke(server, split(b64(JPEG))).status_code == 200


def test_without_a_champion_the_server_refuses_to_start_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/serve_best.py", f"serve.port={free_port()}"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model 'flowers' has no champion")


def predict(*args, uri=None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri} if uri else None
    return subprocess.run([sys.executable, "scripts/predict.py", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "photo.jpg").write_bytes(JPEG)
    (folder / "grey.png").write_bytes(encode(PHOTO.convert("L"), "PNG"))
    return [str(folder / "photo.jpg"), str(folder / "grey.png")]


def test_predict_script_gives_the_same_top_k_from_the_server_and_in_process(server, champion_store, image_files):
    by_url = predict(*image_files, "--url", server, "--json", "--top-k", "2", "--batch-size", "1")
    assert by_url.returncode == 0, by_url.stderr[-2000:]
    lines = [json.loads(line) for line in by_url.stdout.splitlines()]
    assert [line["file"] for line in lines] == image_files
    assert all(len(line["top_k"]) == 2 and set(line["top_k"][0]) == {"class_name", "label", "score"}
               for line in lines)
    in_process = predict(*image_files, "--json", "--top-k", "2", uri=champion_store[0])
    assert in_process.returncode == 0, in_process.stderr[-2000:]
    for a, b in zip(lines, map(json.loads, in_process.stdout.splitlines())):
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        np.testing.assert_allclose([t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], rtol=1e-5)
    text = predict(image_files[0], "--url", server)
    assert text.stdout.startswith(f"{image_files[0]}: ") and text.stdout.count("(") == 3  # top 3 of this model


@pytest.mark.parametrize("args, message", [
    (["missing.jpg"], "no such file: missing.jpg"),
    (["{image}", "--url", "http://127.0.0.1:9"], "cannot reach a server at http://127.0.0.1:9"),
    (["{image}", "--url", "{server}", "--top-k", "9"], "--top-k 9 is more than the model's 3"),
    (["{text}", "--url", "{server}"], "the server answered 400: image 0 is not an image"),
    (["{text}", "--model-uri", "models:/flowers@champion"], "image 0 is not an image"),
    (["{image}", "--model-uri", "models:/nope@champion"], "cannot load models:/nope@champion"),
])
def test_predict_script_errors_are_one_line(server, champion_store, image_files, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not an image")
    args = [a.format(image=image_files[0], server=server, text=tmp_path / "notes.txt") for a in args]
    result = predict(*args, uri=champion_store[0])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr[-1500:]


def test_plain_mlflow_models_serve_serves_the_champion_with_the_same_checks(champion_store):
    """`mlflow models serve --env-manager local` runs the same app without the body limit; the model's own
    checks still answer 400."""
    port = free_port()
    venv_bin = os.path.dirname(sys.executable)  # it runs `uvicorn` from PATH
    command = [os.path.join(venv_bin, "mlflow"), "models", "serve", "-m", "models:/flowers@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion_store[0], "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    with running(command, port, env) as url:
        assert invoke(url, split(b64(JPEG))).json()["predictions"][0]["class_name"] in CLASSES
        bad = invoke(url, split(b64(bomb_png())))
        assert bad.status_code == 400 and "over the limit of 50,000,000" in bad.json()["message"]


def test_predict_script_batches_by_count_and_by_bytes(tmp_path):
    from scripts.predict import batches
    files = []
    for i, size in enumerate([10, 10, 10, 50, 10]):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(b"x" * size)
    assert [[f.name for f in b] for b in batches(files, 2, 100)] == [["0.jpg", "1.jpg"], ["2.jpg", "3.jpg"], ["4.jpg"]]
    assert [len(b) for b in batches(files, 10, 30)] == [3, 1, 1]  # the 50-byte file goes alone


def test_the_workers_socket_turns_nagle_off_on_every_connection():
    """serve.workers > 1 shares listening_socket: asyncio sets TCP_NODELAY on its connections (on uvicorn's own,
    made with proto 0, it did not, and each keep-alive request waited ~40 ms for a delayed ACK); a taken port is a
    one-line error, also for a second server before the first has loaded its model."""
    async def accepted_nodelay(sock: socket.socket) -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                  socket.TCP_NODELAY))
                transport.close()
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)  # closes sock when closed
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(UserError, match=r"cannot listen on 127.0.0.1:\d+ \(Address already in use\); .*PORT="):
            listening_socket("127.0.0.1", taken.getsockname()[1])
    with listening_socket("127.0.0.1", 0) as first:  # a second server started at the same moment
        with pytest.raises(UserError, match="Address already in use"):
            listening_socket("127.0.0.1", first.getsockname()[1])
    assert asyncio.run(accepted_nodelay(listening_socket("127.0.0.1", 0))) == 1


def test_serve_best_on_a_taken_port_is_a_one_line_error_before_any_model_is_looked_up(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "scripts/serve_best.py", f"serve.port={port}"], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert result.returncode == 1 and "serving" not in result.stdout, result.stdout
    assert result.stderr.strip().splitlines()[-1] == (f"error: cannot listen on 127.0.0.1:{port} (Address already in "
                                                      "use); stop what uses it, or pick another port: make serve-best "
                                                      "PORT=9000")


def test_ctrl_c_stops_one_server_process_quietly(champion_store):
    port = free_port()
    process = subprocess.Popen([sys.executable, "scripts/serve_best.py", f"serve.port={port}"], cwd=PROJECT_ROOT,
                               env={**os.environ, "MLFLOW_TRACKING_URI": champion_store[0]}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert serve.wait_until_up(f"http://127.0.0.1:{port}/ping", process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in output and "KeyboardInterrupt" not in output, output[-2000:]
    assert "Finished server process" in output


def test_several_workers_are_started_on_that_socket(monkeypatch):
    started = []

    class Supervisor:  # uvicorn's Multiprocess, without the processes
        def __init__(self, config, sockets):
            started.append((config, sockets))

        def run(self):
            pass
    monkeypatch.setitem(os.environ, serve.APP_ARGS, "")  # serve() sets it for the workers
    monkeypatch.setattr(serve, "Multiprocess", Supervisor)
    serve.serve("models:/flowers@champion", OmegaConf.create({"workers": 2, "host": "127.0.0.1", "port": 0}))
    [(config, [sock])] = started
    with sock:
        assert config.workers == 2 and sock.proto == socket.IPPROTO_TCP and sock.get_inheritable()


def test_the_workers_share_the_cores_unless_serve_threads_says_otherwise(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [threads(OmegaConf.create({"workers": w, "threads": None})) for w in (1, 2, 3, 16)] == [None, 4, 2, 1]
    assert [threads(OmegaConf.create({"workers": w, "threads": 3})) for w in (1, 2)] == [3, 3]
