"""`cvt serve` as a client sees it: a real server process on 127.0.0.1, driven by Triton's client library, plain
HTTP, and headless chromium; answers compared with the model run directly and with `cvt predict`.

One server for the module (a tiny CvT at 64x64, so each request costs milliseconds); the shutdown test starts its own.
Every wait has a timeout, so a hang fails.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_sample_images

from cvt.checkpoint.save import save_model
from cvt.cli import main
from cvt.config import CvTConfig, DataConfig
from cvt.data import create_eval_transform, load_image
from cvt.factory import load_model
from cvt.model import CvT

HOST = "127.0.0.1"
NAME = "tiny"
CLASSES = [f"class {c}" for c in "abcdefghij"]
TIMEOUT = 30  # seconds for any one request or wait


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body) of one HTTP request."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Server:
    """`cvt serve` in a subprocess, ready when constructed."""

    def __init__(self, model_dir: Path, *options: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "cvt", "serve", "--model", str(model_dir), "--name", NAME, "--backend", "torch"]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by stop(); a full pipe would stall the server
        env = os.environ | {"OMP_NUM_THREADS": "1"}  # a tiny model: a second thread only waits on a busy machine
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port), *options], stdout=self.log, stderr=self.log, env=env
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"cvt serve exited with {self.proc.returncode}: {self.log.read()}")
            try:
                if request(self.port, "GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("cvt serve was not ready within 120 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CvT saved as a folder, two real photos (scikit-learn's samples) as JPEG files, and the model."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = CvT(CvTConfig(dims=(16, 32, 48), depths=(1, 1, 2), heads=(1, 2, 3), num_classes=len(CLASSES)))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # logits spread apart: a clear top-k order
    model.data_config, model.class_names, model.model_name = DataConfig(input_size=(64, 64)), CLASSES, NAME
    save_model(model, root / "model")
    photos = []
    for i, pixels in enumerate(load_sample_images().images):
        photos.append(root / f"photo{i}.jpg")
        Image.fromarray(pixels).save(photos[-1], quality=90)
    reference = load_model(root / "model").eval()  # the model as saved, run as it is (not optimized)
    return root / "model", photos, reference


@pytest.fixture(scope="module")
def server(files):
    srv = Server(files[0], "--max-batch", "8", "--max-delay-ms", "20", "--max-body-mb", "1", "--max-pixels", "1000000")
    yield srv
    assert srv.stop() == 0


def model_inputs(reference: CvT, photos: list[Path]) -> torch.Tensor:
    transform = create_eval_transform(reference.data_config)
    return torch.stack([transform(load_image(p)) for p in photos])


@pytest.fixture
def triton_client(server):
    """Triton's HTTP client on the module's server, closed after the test (its gevent pool with it)."""
    client = triton.InferenceServerClient(f"{HOST}:{server.port}", network_timeout=TIMEOUT)
    yield client
    client.close()


def test_triton_client_reads_metadata_and_infers_the_models_logits(triton_client, files):
    _, photos, reference = files
    client = triton_client
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]
    assert client.get_model_metadata(NAME, model_version="1") == meta and client.is_model_ready(NAME, "1")
    x = torch.cat([model_inputs(reference, photos), torch.randn(1, 3, 64, 64)])
    with torch.no_grad():
        expected = reference(x).numpy()
    for binary in (True, False):  # the binary tensor extension (the client's default), and JSON both ways
        images = triton.InferInput("images", list(x.shape), "FP32")
        images.set_data_from_numpy(x.numpy(), binary_data=binary)
        outputs = [triton.InferRequestedOutput("logits", binary_data=binary)]
        result = client.infer(NAME, [images], outputs=outputs, model_version="1" if binary else "")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)
        assert ("parameters" in result.get_output("logits")) == binary


def test_triton_client_sends_encoded_images_and_gets_top_k(triton_client, files):
    _, photos, reference = files
    client = triton_client
    with torch.no_grad():
        expected = reference(model_inputs(reference, photos))
    images = triton.InferInput("images", [len(photos)], "BYTES")  # as OpenVINO Model Server takes images
    images.set_data_from_numpy(np.array([p.read_bytes() for p in photos], dtype=np.object_))
    result = client.infer(NAME, [images], parameters={"top_k": 3}, request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("logits"), expected.numpy(), rtol=1e-4, atol=1e-5)
    top = expected.softmax(-1).topk(3)
    labels = [[CLASSES[i] for i in row] for row in top.indices.tolist()]
    assert result.as_numpy("labels").astype(str).tolist() == labels
    np.testing.assert_allclose(result.as_numpy("scores"), top.values.numpy(), rtol=1e-4)
    # Triton's classification extension, as its client asks for it: "value:index:label", largest first
    requested = triton.InferRequestedOutput("logits", class_count=2)
    rows = client.infer(NAME, [images], outputs=[requested]).as_numpy("logits").astype(str)
    for row, values in zip(rows, expected, strict=True):
        best = values.topk(2)
        assert [r.split(":", 2)[1:] for r in row] == [[str(i), CLASSES[i]] for i in best.indices.tolist()]
        np.testing.assert_allclose([float(r.split(":")[0]) for r in row], best.values.numpy(), rtol=1e-4, atol=1e-5)


def test_predict_answers_as_cvt_predict_does(server, files, tmp_path):
    model_dir, photos, _ = files
    out = tmp_path / "predict.json"
    args = ["predict", "--model", str(model_dir), *map(str, photos), "--topk", "3", "--backend", "torch"]
    assert main([*args, "--json", str(out)]) == 0
    expected = json.loads(out.read_text())
    for photo, reference in zip(photos, expected, strict=True):
        raw = request(server.port, "POST", "/predict?top_k=3", photo.read_bytes(), {"Content-Type": "image/jpeg"})
        form = request(server.port, "POST", "/predict?top_k=3", *multipart("file", photo.name, photo.read_bytes()))
        for status, _, body in (raw, form):
            assert status == 200
            answer = json.loads(body)
            assert [list(p) for p in answer] == [["label", "score"]] * 3  # the keys of transformers' pipeline
            assert [p["label"] for p in answer] == [p["label"] for p in reference["predictions"]]
            scores = [p["probability"] for p in reference["predictions"]]
            np.testing.assert_allclose([p["score"] for p in answer], scores, rtol=1e-4)
    status, _, body = request(server.port, "POST", "/predict?top_k=50", photos[0].read_bytes())
    assert status == 200 and len(json.loads(body)) == len(CLASSES)  # top_k above the classes: all, as the pipeline


def test_concurrent_requests_each_get_their_own_answer(server, files):
    _, _, reference = files
    x = torch.randn(12, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x).numpy()
    # Triton's client sends them at once from its own pool (gevent greenlets in this thread): a client made in each of
    # a dozen threads left gevent hubs behind in dead threads, and the test session crashed later when they were
    # collected (a segmentation fault two test files on, in two fresh-clone runs)
    client = triton.InferenceServerClient(f"{HOST}:{server.port}", network_timeout=TIMEOUT, concurrency=len(x))
    try:
        pending = []
        for i in range(len(x)):
            images = triton.InferInput("images", [1, 3, 64, 64], "FP32")
            images.set_data_from_numpy(x[i : i + 1].numpy())
            pending.append(client.async_infer(NAME, [images]))
        results = [request.get_result(timeout=TIMEOUT).as_numpy("logits")[0] for request in pending]
    finally:
        client.close()
    np.testing.assert_allclose(np.stack(results), expected, rtol=1e-4, atol=1e-5)


def v2_body(tensor: dict, outputs: list | None = None, parameters: dict | None = None) -> bytes:
    body = {"inputs": [tensor], "outputs": outputs or [], "parameters": parameters or {}}
    return json.dumps(body).encode()


def hostile_requests(photo: bytes) -> dict[str, tuple]:
    """name -> (method, path, body, headers, expected status)."""
    infer = f"/v2/models/{NAME}/infer"
    image = {"name": "images", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [0.0] * (3 * 64 * 64)}
    nine = image | {"shape": [9, 3, 64, 64], "data": [0.0] * (9 * 3 * 64 * 64)}
    encoded = {"name": "images", "datatype": "BYTES", "shape": [1]}
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 megapixels in a few kB, above --max-pixels 1e6
    header = json.dumps({"inputs": [image | {"parameters": {"binary_data_size": 49152}, "data": None}]}).encode()
    length = "Inference-Header-Content-Length"
    form = {"Content-Type": "multipart/form-data; boundary=zz"}
    no_file = b'--zz\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue\r\n--zz--\r\n'
    return {
        "garbage": ("POST", infer, b"\x00\xff garbage", {}, 400),
        "empty body": ("POST", infer, b"", {}, 400),
        "broken JSON": ("POST", infer, b'{"inputs": [', {}, 400),
        "JSON not an object": ("POST", infer, b"[1, 2]", {}, 400),
        "no inputs": ("POST", infer, b'{"inputs": []}', {}, 400),
        "wrong shape": ("POST", infer, v2_body(image | {"shape": [1, 3, 32, 128]}), {}, 400),
        "wrong dtype": ("POST", infer, v2_body(image | {"datatype": "INT64", "data": [0] * 12288}), {}, 400),
        "strings as FP32": ("POST", infer, v2_body(image | {"data": ["x"] * 12288}), {}, 400),
        "data shorter than shape": ("POST", infer, v2_body(image | {"data": [0.0] * 10}), {}, 400),
        "negative dimension": ("POST", infer, v2_body(image | {"shape": [-1, 3, 64, 64]}), {}, 400),
        "wrong input name": ("POST", infer, v2_body(image | {"name": "x"}), {}, 400),
        "unknown datatype": ("POST", infer, v2_body(image | {"datatype": "FP8"}), {}, 400),
        "binary size past the body": ("POST", infer, header + b"\0" * 100, {length: str(len(header))}, 400),
        "header length past the body": ("POST", infer, header, {length: "99999"}, 400),
        "not base64 BYTES": ("POST", infer, v2_body(encoded | {"data": ["%%"]}), {}, 400),
        "BYTES not an image": ("POST", infer, v2_body(encoded | {"data": ["aGVsbG8="]}), {}, 400),
        "more images than --max-batch": ("POST", infer, v2_body(nine), {}, 400),
        "unknown output": ("POST", infer, v2_body(image, outputs=[{"name": "features"}]), {}, 400),
        "bad top_k parameter": ("POST", infer, v2_body(image, parameters={"top_k": "five"}), {}, 400),
        "unknown model": ("POST", "/v2/models/other/infer", v2_body(image), {}, 404),
        "unknown model metadata": ("GET", "/v2/models/other", b"", {}, 404),
        "predict: empty body": ("POST", "/predict", b"", {}, 400),
        "predict: not an image": ("POST", "/predict", b"hello, this is text", {}, 400),
        "predict: truncated JPEG": ("POST", "/predict", photo[: len(photo) // 3], {}, 400),
        "predict: decompression bomb": ("POST", "/predict", bomb.getvalue(), {}, 400),
        "predict: body too large": ("POST", "/predict", b"\0" * (2 << 20), {}, 413),
        "predict: gzip bomb": ("POST", "/predict", gzip.compress(b"\0" * (4 << 20)), {"Content-Encoding": "gzip"}, 413),
        "predict: broken gzip": ("POST", "/predict", b"not gzip", {"Content-Encoding": "gzip"}, 400),
        "predict: unknown encoding": ("POST", "/predict", photo, {"Content-Encoding": "br"}, 415),
        "predict: top_k=0": ("POST", "/predict?top_k=0", photo, {}, 400),
        "predict: form without a file": ("POST", "/predict", no_file, form, 400),
        "predict: broken form": ("POST", "/predict", b"--zz\r\nbroken", form, 400),
        "attention: garbage": ("POST", "/attention", b"\x89PNG\r\n\x1a\n garbage", {}, 400),
    }


def test_hostile_requests_get_a_4xx_with_one_line_and_the_server_stays_ready(server, files):
    photo = files[1][0].read_bytes()
    wrong = {}
    for name, (method, path, body, headers, expected) in hostile_requests(photo).items():
        status, _, answer = request(server.port, method, path, body, headers)
        reason = json.loads(answer).get("error", "") if answer.startswith(b"{") else answer.decode(errors="replace")
        if status != expected or not reason or "\n" in reason:
            wrong[name] = (status, reason)
        assert request(server.port, "GET", "/v2/health/ready")[0] == 200, f"not ready after {name!r}"
    assert not wrong, wrong
    status, _, body = request(server.port, "POST", "/predict", photo)
    assert status == 200 and len(json.loads(body)) == 5


def test_metrics_count_requests_errors_batches_and_queue(server, files):
    photo = files[1][0].read_bytes()
    request(server.port, "POST", "/predict", photo)
    request(server.port, "POST", "/predict", b"")
    _, headers, body = request(server.port, "GET", "/metrics")
    assert headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):  # prometheus_client's own parser
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("cvt_requests_total", (("route", "/predict"),))] >= 2
    assert samples[("cvt_request_errors_total", (("route", "/predict"), ("status", "400")))] >= 1
    assert samples[("cvt_request_duration_seconds_count", (("route", "/predict"),))] >= 2
    assert samples[("cvt_batch_size_count", ())] >= 1 and samples[("cvt_batch_size_sum", ())] >= 1
    assert samples[("cvt_queue_depth", ())] == 0


def test_sigterm_answers_what_is_in_flight_and_exits_0(files):
    """Two requests wait in a gathering batch (1.5 s delay) when SIGTERM arrives: both are answered with the right
    logits, a third finds the queue full (503, Retry-After), the process exits 0 and stops listening."""
    model_dir, _, reference = files
    srv = Server(model_dir, "--max-batch", "8", "--max-delay-ms", "1500", "--max-queue", "2")
    try:
        x = torch.randn(2, 3, 64, 64)
        answers: dict[int, tuple] = {}

        def infer(i: int) -> None:
            tensor = {"name": "images", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": x[i].flatten().tolist()}
            body = v2_body(tensor)
            answers[i] = request(srv.port, "POST", f"/v2/models/{NAME}/infer", body)

        threads = [threading.Thread(target=infer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while b"cvt_queue_depth 2.0" not in request(srv.port, "GET", "/metrics")[2]:
            assert time.monotonic() < deadline, "the two requests never reached the queue"
            time.sleep(0.02)
        status, headers, body = request(srv.port, "POST", "/predict", files[1][0].read_bytes())
        assert status == 503 and headers["retry-after"] == "1", body
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(TIMEOUT)
        assert srv.proc.wait(TIMEOUT) == 0
    finally:
        srv.stop()
    with torch.no_grad():
        expected = reference(x).numpy()
    for i in range(2):
        status, _, body = answers[i]
        assert status == 200, body
        np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], expected[i], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConnectionRefusedError):
        request(srv.port, "GET", "/v2/health/live")


def test_page_in_headless_chromium_shows_the_top_5_and_the_attention_map(server, files, tmp_path):
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_path, "needs Debian's chromium and chromium-driver (.ci/run installs them with apt-get)"
    photo = files[1][0]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.get(f"http://{HOST}:{server.port}/")
        assert NAME in driver.title
        driver.find_element(By.ID, "file").send_keys(str(photo))
        wait = WebDriverWait(driver, TIMEOUT)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".prediction")) == 5)
        wait.until(lambda d: d.execute_script("return document.getElementById('attention').naturalWidth") == 64)
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".prediction .label")]
        status = driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
    _, _, body = request(server.port, "POST", "/predict?top_k=5", photo.read_bytes())
    assert shown == [p["label"] for p in json.loads(body)]
    assert status == f"{photo.name}: {shown[0]}"
    assert (tmp_path / "page.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "option, value, message",
    [("--max-batch", "0", "--max-batch must be at least 1"), ("--timeout", "-1", "--timeout must be positive")],
)
def test_bad_options_are_usage_errors(option, value, message, capsys):
    assert main(["serve", "--model", "nowhere", option, value]) == 2
    assert message in capsys.readouterr().err
