"""Bad input, overload, timeouts and disconnects: every request ends in an answer or an explicit
error, the server stays healthy, and the counters add up."""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import LiveServer, metric_sum, scrape, service_settings


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _v2(inputs: list[dict], **extra) -> dict:
    return {"json": {"inputs": inputs, **extra}}


def _fp32(shape: list[int], data: list, datatype: str = "FP32", name: str = "input") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def bad_requests(png: bytes, image: np.ndarray, max_batch: int, max_body: int) -> list[tuple[str, str, str, dict]]:
    """(label, method, path, httpx kwargs) for requests the server must refuse with a 4xx."""
    raw = {"content-type": "image/png"}
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 16] = b"\xff" * 16
    zeros = [0.0] * 784
    binary_nan = json.dumps({"inputs": [{**_fp32([1, 1, 28, 28], []), "parameters": {"binary_data_size": 3136}}]})
    binary_nan = binary_nan.replace(', "data": []', "")
    nan_blob = np.full(784, np.nan, dtype="<f4").tobytes()
    header = {"Inference-Header-Content-Length": str(len(binary_nan))}

    def chunks():
        for _ in range(max_body // 65536 + 2):
            yield b"\0" * 65536

    infer = "/v2/models/dyce/infer"
    return [
        ("empty body", "POST", "/v1/classify", {"content": b"", "headers": raw}),
        ("text as png", "POST", "/v1/classify", {"content": b"hello, I am not an image", "headers": raw}),
        ("truncated png", "POST", "/v1/classify", {"content": png[: len(png) // 2], "headers": raw}),
        ("corrupt png", "POST", "/v1/classify", {"content": bytes(corrupt), "headers": raw}),
        ("truncated jpeg", "POST", "/v1/classify", {"content": _encoded(image, "JPEG")[:100], "headers": raw}),
        ("gif", "POST", "/v1/classify", {"content": _encoded(image, "GIF"), "headers": raw}),
        ("bmp", "POST", "/v1/classify", {"content": _encoded(image, "BMP"), "headers": raw}),
        ("text/plain", "POST", "/v1/classify", {"content": png, "headers": {"content-type": "text/plain"}}),
        ("no content type", "POST", "/v1/classify", {"content": png}),
        ("decompression bomb", "POST", "/v1/classify", {"content": _png_claiming(100_000, 100_000), "headers": raw}),
        ("declared oversize", "POST", "/v1/classify", {"content": b"\0" * (max_body + 1), "headers": raw}),
        ("chunked oversize", "POST", "/v1/classify", {"content": chunks(), "headers": raw}),
        ("multipart without file", "POST", "/v1/classify", {"files": {"other": ("x.png", png, "image/png")}}),
        (
            "multipart broken",
            "POST",
            "/v1/classify",
            {"content": b"--zz\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
        ),
        ("two files to single", "POST", "/v1/classify", {"files": [("file", png), ("file", png)]}),
        ("too many files", "POST", "/v1/classify/batch", {"files": [("files", png)] * (max_batch + 1)}),
        ("top_k zero", "POST", "/v1/classify?top_k=0", {"content": png, "headers": raw}),
        ("lambda out of range", "POST", "/v1/classify?lambda=2", {"content": png, "headers": raw}),
        ("lambda not a number", "POST", "/v1/classify?lambda=abc", {"content": png, "headers": raw}),
        (
            "two tier selectors",
            "POST",
            "/v1/classify?lambda=0.5&max_relative_macs=0.5",
            {"content": png, "headers": raw},
        ),
        (
            "v2 malformed json",
            "POST",
            infer,
            {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
        ),
        ("v2 json list", "POST", infer, {"json": [1, 2, 3]}),
        ("v2 no inputs", "POST", infer, _v2([])),
        ("v2 wrong shape", "POST", infer, _v2([_fp32([1, 3, 28, 28], zeros * 3)])),
        ("v2 wrong dtype", "POST", infer, _v2([_fp32([1, 1, 28, 28], zeros, "INT32")])),
        (
            "v2 nan json",
            "POST",
            infer,
            {"content": json.dumps({"inputs": [_fp32([1, 1, 28, 28], [float("nan")] * 784)]})},
        ),
        ("v2 nan binary", "POST", infer, {"content": binary_nan.encode() + nan_blob, "headers": header}),
        ("v2 value count", "POST", infer, _v2([_fp32([1, 1, 28, 28], zeros[:-1])])),
        ("v2 strings as fp32", "POST", infer, _v2([_fp32([1, 1, 28, 28], ["a"] * 784)])),
        ("v2 unknown input", "POST", infer, _v2([_fp32([1, 1, 28, 28], zeros, name="pixels")])),
        ("v2 two inputs", "POST", infer, _v2([_fp32([1, 1, 28, 28], zeros), _fp32([1, 1, 28, 28], zeros)])),
        ("v2 unknown model", "POST", "/v2/models/resnet/infer", _v2([_fp32([1, 1, 28, 28], zeros)])),
        (
            "v2 header beyond body",
            "POST",
            infer,
            {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}},
        ),
        ("v2 header not int", "POST", infer, {"content": b"{}", "headers": {"Inference-Header-Content-Length": "x"}}),
        ("v2 binary size too big", "POST", infer, {"content": binary_nan.encode() + nan_blob[:100], "headers": header}),
        ("v2 bad base64", "POST", infer, _v2([_fp32([1], ["***"], "BYTES", "image")])),
        ("v2 bytes not image", "POST", infer, _v2([_fp32([1], ["aGVsbG8="], "BYTES", "image")])),
        ("v2 batch too big", "POST", infer, _v2([_fp32([max_batch + 1, 1, 28, 28], zeros * (max_batch + 1))])),
        ("v2 unknown output", "POST", infer, _v2([_fp32([1, 1, 28, 28], zeros)], outputs=[{"name": "logits"}])),
        ("v2 bad parameter", "POST", infer, _v2([_fp32([1, 1, 28, 28], zeros)], parameters={"lambda": "high"})),
        ("v2 gzip", "POST", infer, {"content": zlib.compress(b"{}"), "headers": {"content-encoding": "gzip"}}),
        ("unknown route", "GET", "/v3/anything", {}),
        ("wrong method", "GET", "/v1/classify", {}),
    ]


def test_bad_input_corpus_gets_clear_4xx_and_the_server_stays_healthy(live_server, fmnist_pngs, fmnist_test_images):
    settings = live_server.settings
    corpus = bad_requests(fmnist_pngs[0], fmnist_test_images[0][0], settings.max_batch_size, settings.max_body_bytes)
    assert len(corpus) >= 30
    before = scrape(live_server.url)
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for label, method, path, kwargs in corpus:
            response = client.request(method, path, **kwargs)
            assert 400 <= response.status_code < 500, f"{label}: {response.status_code} {response.text[:200]}"
            body = response.json()
            assert isinstance(body["error"], str) and body["error"] and body["code"], label
            assert client.get("/v2/health/ready").status_code == 200, f"unhealthy after {label}"
        assert client.post("/v1/classify", content=fmnist_pngs[1], headers={"content-type": "image/png"}).is_success
    after = scrape(live_server.url)
    rejected = metric_sum(after, "dyce_rejections_total") - metric_sum(before, "dyce_rejections_total")
    assert rejected == len(corpus)
    assert metric_sum(after, "dyce_rejections_total", reason="too_large") >= 3
    assert metric_sum(after, "dyce_rejections_total", reason="unsupported_media_type") >= 3
    assert metric_sum(after, "dyce_model_ready") == 1


@pytest.fixture(scope="module")
def overload_server(core_demo_artifacts):
    """No batching, two queue slots, pinned to the most expensive tier: easy to overload."""
    settings = service_settings(
        core_demo_artifacts, autoswitch="manual", max_batch_size=1, queue_capacity=2, max_queue_delay_ms=0
    )
    with LiveServer(settings) as server:
        yield server


def test_overload_answers_429_with_retry_after_and_every_request_is_counted(overload_server, fmnist_pngs):
    url = overload_server.url
    before = scrape(url)

    def post(png: bytes) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as client:
            return client.post("/v1/classify", content=png, headers={"content-type": "image/png"})

    sent = 64
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(post, fmnist_pngs[:sent]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1" and response.json()["code"] == "queue_full"
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    route = {"route": "/v1/classify"}
    assert delta("dyce_requests_total", **route) == sent
    assert delta("dyce_requests_total", status="200", **route) == statuses.count(200)
    assert delta("dyce_rejections_total", reason="queue_full") == statuses.count(429)
    assert delta("dyce_request_duration_seconds_count", **route) == sent
    assert delta("dyce_batch_size_sum") == statuses.count(200), "only admitted requests reach the model"
    assert metric_sum(after, "dyce_queue_depth") == 0 and metric_sum(after, "dyce_in_flight_requests") == 1


@pytest.fixture(scope="module")
def slow_batching_server(core_demo_artifacts):
    """Batches wait 400 ms for company: long enough to time out or hang up before any model work."""
    settings = service_settings(core_demo_artifacts, autoswitch="manual", max_queue_delay_ms=400, request_timeout_s=5)
    with LiveServer(settings) as server:
        yield server


def test_client_disconnect_spends_no_model_work(slow_batching_server, fmnist_pngs):
    url = slow_batching_server.url
    before = scrape(url)
    png = fmnist_pngs[0]
    request = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
    ).encode() + png
    with socket.create_connection(("127.0.0.1", slow_batching_server.port)) as sock:
        sock.sendall(request)
        time.sleep(0.1)  # the server has the request queued; now hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(url)
        if metric_sum(after, "dyce_rejections_total", reason="client_disconnect") > metric_sum(
            before, "dyce_rejections_total", reason="client_disconnect"
        ):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnect was never accounted for")
    time.sleep(0.6)  # past the batching delay: a leaked job would have run by now
    after = scrape(url)
    assert metric_sum(after, "dyce_batch_size_count") == metric_sum(before, "dyce_batch_size_count")
    assert (
        metric_sum(after, "dyce_requests_total", status="499")
        == metric_sum(before, "dyce_requests_total", status="499") + 1
    )
    assert metric_sum(after, "dyce_in_flight_requests") == 1


def test_request_timeout_answers_504_before_any_model_work(core_demo_artifacts, fmnist_pngs):
    settings = service_settings(core_demo_artifacts, autoswitch="manual", max_queue_delay_ms=400, request_timeout_s=0.1)
    with LiveServer(settings) as server:
        before = scrape(server.url)
        response = httpx.post(
            f"{server.url}/v1/classify", content=fmnist_pngs[0], headers={"content-type": "image/png"}
        )
        assert response.status_code == 504 and response.json()["code"] == "timeout"
        time.sleep(0.6)
        after = scrape(server.url)
        assert metric_sum(after, "dyce_batch_size_count") == metric_sum(before, "dyce_batch_size_count")
        assert metric_sum(after, "dyce_rejections_total", reason="timeout") == 1


@pytest.mark.parametrize("token", ["", "changeme"])
def test_dyce_serve_refuses_a_placeholder_admin_token(token, tmp_path):
    env = {"DYCE_ADMIN_TOKEN": token, "DYCE_ARTIFACTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DYCE_ADMIN_TOKEN" in result.stderr and "DYCE_INSECURE_DEV" in result.stderr


def test_dyce_serve_explains_missing_artefacts(tmp_path):
    env = {"DYCE_ADMIN_TOKEN": "a-real-secret-of-some-length", "DYCE_ARTIFACTS_DIR": str(tmp_path), "DYCE_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "dyce-offline build" in result.stderr


def test_insecure_dev_mode_generates_a_token_instead_of_running_open():
    from pydantic import ValidationError

    from service import Settings

    with pytest.raises(ValidationError, match="DYCE_INSECURE_DEV"):
        Settings(admin_token="admin")
    dev = Settings(admin_token="", insecure_dev=True)
    assert dev.generated_admin_token and len(dev.admin_token.get_secret_value()) >= 24
    assert Settings(admin_token="", insecure_dev=True).admin_token != dev.admin_token
    assert not Settings(admin_token="a-real-secret-of-some-length").generated_admin_token
