"""The request path made cheaper (#13) still answers as it did.

- the decoder calls torchvision's kernels directly: its tensors equal the backbone's own
  transform (``PreprocessSpec.transform()``, the definition) bit for bit, for every image mode,
  alone and in a batch of mixed modes and sizes;
- the hot routes are answered by the edge's fast path when the request has no query string, and
  by FastAPI's routing otherwise: both give the same answer, the same error shape, and are counted
  under the route's template;
- a response's head and body leave in one write, and responses without a body write (HEAD) or
  after ``100 Continue`` still complete on a kept connection.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dyce.preprocess import FASHION_MNIST, IMAGENET
from service.edge.decode import ImageDecoder
from service.edge.protocol import _HeadWithBody
from service.engine.model import ModelRuntime
from service.errors import BadRequest
from tests.conftest import metric_sum, scrape, service_settings

PNG = {"content-type": "image/png"}
MODES = ["L", "RGB", "RGBA", "P", "LA", "I;16", "1"]
SIZES = [(28, 28), (300, 200), (17, 40), (224, 224), (257, 256)]


def _random_png(rng: np.random.Generator, mode: str, width: int, height: int) -> bytes:
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("spec", [FASHION_MNIST, IMAGENET], ids=["fmnist", "imagenet"])
@pytest.mark.parametrize("mode", MODES)
def test_decoder_matches_the_backbone_transform_bit_for_bit(spec, mode):
    decoder = ImageDecoder(spec, max_pixels=1 << 30, max_side=10_000, max_aspect_ratio=16)
    reference = spec.transform()
    rng = np.random.default_rng(13)
    for width, height in SIZES:
        data = _random_png(rng, mode, width, height)
        expected = reference(Image.open(io.BytesIO(data)))
        got = decoder(data)
        assert got.dtype == expected.dtype == torch.float32
        assert got.shape == expected.shape == (spec.channels, spec.crop, spec.crop)
        assert torch.equal(got, expected), (mode, width, height)


@pytest.mark.parametrize("spec", [FASHION_MNIST, IMAGENET], ids=["fmnist", "imagenet"])
def test_a_batch_of_mixed_images_equals_each_image_through_the_backbone_transform(spec):
    """Rows of every mode and size, some that skip resize and crop (fmnist at 28x28) and some
    that need them, decoded together: each row is its own image's transform, bit for bit."""
    decoder = ImageDecoder(spec, max_pixels=1 << 30, max_side=10_000, max_aspect_ratio=16)
    reference = spec.transform()
    rng = np.random.default_rng(7)
    blobs = [_random_png(rng, mode, width, height) for mode in MODES for width, height in SIZES]
    order = rng.permutation(len(blobs))
    blobs = [blobs[i] for i in order]
    got = decoder.batch([decoder.open(blob) for blob in blobs])
    expected = torch.stack([reference(Image.open(io.BytesIO(blob))) for blob in blobs])
    assert got.shape == (len(blobs), spec.channels, spec.crop, spec.crop)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)
    # one bad image fails the whole batch with the 4xx an image alone gets
    truncated = blobs[0][: len(blobs[0]) // 2]
    opened = [decoder.open(blobs[1]), decoder.open(truncated)]  # the header is whole
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        decoder.batch(opened)


def _comparable(answer: dict) -> dict:
    """An answer without what differs between two requests for the same image: time and batching."""
    return {key: value for key, value in answer.items() if key not in ("timings", "batch_size")}


def test_fast_path_and_routed_requests_answer_alike_and_count_under_the_route(live_server, client, fmnist_pngs):
    png = fmnist_pngs[0]
    before = scrape(live_server.url)
    fast = client.post("/v1/classify", content=png, headers=PNG)
    # Any query string goes through FastAPI's routing; top_k=5 is the default.
    routed = client.post("/v1/classify?top_k=5", content=png, headers=PNG)
    assert fast.status_code == routed.status_code == 200, (fast.text, routed.text)
    assert _comparable(fast.json()) == _comparable(routed.json())
    for name in ("x-config-id", "x-lambda", "x-exit-position", "content-type"):
        assert fast.headers[name] == routed.headers[name], name
    for name in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(fast.headers[name]) >= 0
    labels = live_server.engine.runtime.labels
    predictions = fast.json()["predictions"]
    assert [p["label"] for p in predictions] == [labels[p["class_index"]] for p in predictions]
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)

    files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(fmnist_pngs[:3])]
    fast_batch = client.post("/v1/classify/batch", files=files)
    routed_batch = client.post("/v1/classify/batch?top_k=5", files=files)
    assert fast_batch.status_code == routed_batch.status_code == 200
    assert _comparable(fast_batch.json()) == _comparable(routed_batch.json())
    assert len(fast_batch.json()["results"]) == 3

    # Refusals on the fast path: the same JSON shape and code as FastAPI's route gives them.
    fast_415 = client.post("/v1/classify", content=png, headers={"content-type": "image/gif"})
    routed_415 = client.post("/v1/classify?top_k=5", content=png, headers={"content-type": "image/gif"})
    assert fast_415.status_code == routed_415.status_code == 415
    assert fast_415.json() == routed_415.json()
    assert fast_415.headers["x-error-code"] == "unsupported_media_type"

    after = scrape(live_server.url)

    def counted(route: str, status: str) -> float:
        return metric_sum(after, "dyce_requests_total", route=route, status=status) - metric_sum(
            before, "dyce_requests_total", route=route, status=status
        )

    assert counted("/v1/classify", "200") == 2
    assert counted("/v1/classify/batch", "200") == 2
    assert counted("/v1/classify", "415") == 2
    assert counted("unmatched", "200") == 0


def test_v2_infer_fast_path_and_routed_requests_answer_alike(live_server, client, fmnist_pngs):
    blobs = fmnist_pngs[:2]
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": []}],
        "outputs": [{"name": "label"}, {"name": "exit_position"}],
    }
    body["inputs"][0]["data"] = [base64.b64encode(b).decode() for b in blobs]
    answers = []
    for path in ("/v2/models/dyce/infer", "/v2/models/dyce/infer?via=router", "/v2/models/dyce/versions/1/infer"):
        response = client.post(path, json=body)
        assert response.status_code == 200, (path, response.text)
        answer = response.json()
        answer["parameters"] = {
            k: v for k, v in answer["parameters"].items() if k not in ("queue_time_ms", "inference_time_ms")
        }
        answers.append(answer)
    assert answers[0] == answers[1] == answers[2]
    unknown = client.post("/v2/models/other/infer", json=body)
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"


def _read_response(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(status line + headers, body, what was read past it) of one response with a content-length."""
    received = buffered
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response head"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return head, rest[:length], rest[length:]


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_the_response_head_leaves_with_the_body_in_one_write():
    async def scenario() -> list[list[bytes]]:
        outcomes = []
        # head then body in the same step: one write; a 100 Continue before the response goes straight out
        transport = _RecordingTransport()
        held = _HeadWithBody(transport)
        held.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        held.write(b"HEAD")
        held.write(b"BODY")
        held.write(b"MORE")  # a streamed chunk after the first
        await asyncio.sleep(0)
        outcomes.append(transport.writes)
        # no body write (a HEAD request): the head goes out on the next turn of the loop
        transport = _RecordingTransport()
        held = _HeadWithBody(transport)
        held.write(b"HEAD")
        assert transport.writes == []
        await asyncio.sleep(0)
        outcomes.append(transport.writes)
        # closed with the head still held (the app failed after starting): the head goes first
        transport = _RecordingTransport()
        held = _HeadWithBody(transport)
        held.write(b"HEAD")
        held.close()
        await asyncio.sleep(0)
        outcomes.append([*transport.writes, b"closed" if transport.closed else b"open"])
        return outcomes

    continued, head_only, closed = asyncio.run(scenario())
    assert continued == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HEADBODY", b"MORE"]
    assert head_only == [b"HEAD"]
    assert closed == [b"HEAD", b"closed"]


def test_head_requests_and_100_continue_still_complete_on_a_kept_connection(live_server, fmnist_pngs):
    png = fmnist_pngs[0]
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=30) as sock:
        # HEAD: uvicorn writes no body, so the held head must go out on its own.
        sock.sendall(b"HEAD /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the HEAD response"
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and rest == b""

        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\nexpect: 100-continue\r\n"
            b"content-length: %d\r\n\r\n" % len(png)
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before 100 Continue"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(png)
        head, body, _ = _read_response(sock, interim.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(body)["predictions"]

    assert httpx.get(f"{live_server.url}/v2/health/live").status_code == 200


@pytest.mark.parametrize("memory_format", ["auto", "contiguous"])
def test_warm_up_tunes_the_segments_only_when_asked(core_demo_artifacts, memory_format, caplog):
    runtime = ModelRuntime(service_settings(core_demo_artifacts, memory_format=memory_format))
    with caplog.at_level(logging.INFO, logger="dyce.service"):
        runtime.warm_up(runtime.initial_bank)
    backend = runtime.executor.backend
    tuned = "segments as timed fastest" in caplog.text
    if memory_format == "contiguous":
        assert not tuned
        assert backend.memory_formats == [torch.contiguous_format] * runtime.num_positions
        assert backend.singly_below == [0] * runtime.num_positions
        assert all(p.is_contiguous() for segment in backend.segments for p in segment.parameters())
    else:
        assert tuned
    # Whatever was chosen, each segment's weights are laid out as its inputs will be: no
    # conversion hides in every call.
    for segment, memory_format_used in zip(backend.segments, backend.memory_formats, strict=True):
        for weight in (p for p in segment.parameters() if p.dim() == 4):
            assert weight.is_contiguous(memory_format=memory_format_used)
