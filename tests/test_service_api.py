"""End-to-end: a real uvicorn server on a loopback port, driven over HTTP."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http
from PIL import Image

from dyce.artifacts import ArtifactLayout, load_bank_for
from dyce.preprocess import FASHION_MNIST
from tests.conftest import FASHION_MNIST_LABELS


@pytest.fixture(scope="module")
def bank(core_demo_artifacts):
    return load_bank_for(ArtifactLayout(core_demo_artifacts))


def _consistent(answer: dict, bank) -> None:
    """The image's exit and cost are possible under the one configuration the answer names."""
    entry = bank.entries[answer["tier"]["bank_index"]]
    assert entry.config_id == answer["tier"]["config_id"]
    position = answer["exit_position"]
    assert entry.config.exits[position] != 0, "left at an exit its configuration does not enable"
    assert answer["relative_macs"] == pytest.approx(bank.macs.path_costs(entry.config)[position])


def test_classify_raw_png_matches_the_plain_model_at_the_top_tier(client, fmnist_pngs, bank, live_server):
    response = client.post("/v1/classify", content=fmnist_pngs[0], headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    answer = response.json()
    top = bank.most_accurate()
    assert answer["tier"]["bank_index"] == top and answer["tier_source"] == "active"
    assert answer["num_positions"] == bank.num_positions
    assert len(answer["predictions"]) == 5
    probabilities = [p["probability"] for p in answer["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    _consistent(answer, bank)
    # The same image through the executor in-process gives the same answer.
    runtime = live_server.engine.runtime
    image = FASHION_MNIST.transform()(Image.open(io.BytesIO(fmnist_pngs[0]))).unsqueeze(0)
    expected = runtime.run(image, bank.entries[top].config)
    assert answer["exit_position"] == int(expected.exit_positions[0])
    assert answer["predictions"][0]["class_index"] == int(expected.probabilities[0].argmax())
    assert answer["predictions"][0]["probability"] == pytest.approx(float(expected.probabilities[0].max()), abs=1e-5)
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0
    assert float(response.headers["x-total-time"]) >= float(response.headers["x-inference-time"])
    assert response.headers["x-config-id"] == answer["tier"]["config_id"]


def test_classify_multipart_jpeg_and_webp(client, fmnist_test_images):
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buffer = io.BytesIO()
        Image.fromarray(fmnist_test_images[0][3]).save(buffer, format=fmt)
        response = client.post("/v1/classify?top_k=2", files={"file": ("x", buffer.getvalue(), mime)})
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 2


def test_batch_variant_answers_every_image_under_one_tier(client, fmnist_pngs, bank):
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(fmnist_pngs[:6])]
    response = client.post("/v1/classify/batch?top_k=1", files=files)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["results"]) == 6
    for result in answer["results"]:
        _consistent({**result, "tier": answer["tier"]}, bank)


def test_a_request_gets_the_tier_it_asks_for(client, fmnist_pngs, bank):
    cheapest = min(range(len(bank.entries)), key=lambda i: bank.entries[i].search.relative_macs)
    costs = {}
    for query, expected_index in (
        ({"lambda": bank.entries[cheapest].lam}, cheapest),
        ({"max_relative_macs": bank.entries[cheapest].search.relative_macs + 1e-9}, cheapest),
        ({"lambda": 1.0}, bank.nearest_lambda(1.0)),
    ):
        answers = [
            client.post("/v1/classify", params=query, content=png, headers={"content-type": "image/png"}).json()
            for png in fmnist_pngs[:20]
        ]
        for answer in answers:
            assert answer["tier"]["bank_index"] == expected_index and answer["tier_source"] == "request"
            _consistent(answer, bank)
        costs[expected_index] = np.mean([a["relative_macs"] for a in answers])
    assert costs[cheapest] < 0.5 * costs[bank.nearest_lambda(1.0)], "tiers must really differ in compute"
    too_small = client.post(
        "/v1/classify",
        params={"max_relative_macs": 1e-6},
        content=fmnist_pngs[0],
        headers={"content-type": "image/png"},
    )
    assert too_small.status_code == 422 and "cheapest" in too_small.json()["error"]


def test_open_inference_protocol_metadata(client, live_server):
    assert client.get("/v2").json()["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    metadata = client.get("/v2/models/dyce").json()
    assert {t["name"] for t in metadata["inputs"]} == {"input", "image"}
    assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]
    config = client.get("/v2/models/dyce/config").json()
    assert config["max_batch_size"] == live_server.settings.max_batch_size
    assert client.get("/v2/models/dyce/ready").status_code == 200
    assert client.get("/v2/models/nope").status_code == 404


def test_v2_json_tensors_fp32_and_base64_bytes(client, fmnist_test_images, fmnist_pngs):
    images = fmnist_test_images[0][:3]
    tensor = torch.stack([FASHION_MNIST.transform()(Image.fromarray(im)) for im in images])
    fp32 = {
        "id": "req-1",
        "inputs": [
            {"name": "input", "shape": list(tensor.shape), "datatype": "FP32", "data": tensor.flatten().tolist()}
        ],
    }
    by_tensor = client.post("/v2/models/dyce/infer", json=fp32)
    assert by_tensor.status_code == 200, by_tensor.text
    body = by_tensor.json()
    assert body["id"] == "req-1" and body["model_name"] == "dyce"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [3, 10]
    encoded = [base64.b64encode(png).decode() for png in fmnist_pngs[:3]]
    by_bytes = client.post(
        "/v2/models/dyce/infer",
        json={"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": encoded}]},
    )
    assert by_bytes.status_code == 200, by_bytes.text
    bytes_outputs = {o["name"]: o for o in by_bytes.json()["outputs"]}
    # PNG is lossless, so both paths see the same pixels.
    np.testing.assert_allclose(bytes_outputs["probabilities"]["data"], outputs["probabilities"]["data"], atol=1e-5)
    assert bytes_outputs["label"]["data"] == outputs["label"]["data"]


def test_tritonclient_drives_the_service_unmodified(live_server, fmnist_test_images, fmnist_pngs, bank):
    client = triton_http.InferenceServerClient(url=live_server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("dyce")
        assert client.get_model_config("dyce")["max_batch_size"] == live_server.settings.max_batch_size
        assert client.get_model_metadata("dyce")["name"] == "dyce"
        images = fmnist_test_images[0][:4]
        batch = torch.stack([FASHION_MNIST.transform()(Image.fromarray(im)) for im in images]).numpy()
        fp32 = triton_http.InferInput("input", list(batch.shape), "FP32")
        fp32.set_data_from_numpy(batch, binary_data=True)
        result = client.infer("dyce", [fp32], parameters={"lambda": 0.0})
        probabilities = result.as_numpy("probabilities")
        positions = result.as_numpy("exit_position")
        assert probabilities.shape == (4, 10) and positions.shape == (4,)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        tier = result.get_response()["parameters"]
        assert tier["bank_index"] == bank.nearest_lambda(0.0)
        costs = bank.macs.path_costs(bank.entries[tier["bank_index"]].config)
        np.testing.assert_allclose(result.as_numpy("relative_macs"), costs[positions], rtol=1e-6)

        encoded = triton_http.InferInput("image", [2], "BYTES")
        encoded.set_data_from_numpy(np.array(fmnist_pngs[:2], dtype=np.object_), binary_data=True)
        wanted = [
            triton_http.InferRequestedOutput("label", binary_data=False),
            triton_http.InferRequestedOutput("probabilities"),
        ]
        result = client.infer("dyce", [encoded], outputs=wanted)
        labels = result.as_numpy("label")  # JSON BYTES come back as str
        assert labels.shape == (2,) and set(labels.tolist()) <= set(FASHION_MNIST_LABELS)
        assert result.as_numpy("probabilities").shape == (2, 10)
        with pytest.raises(triton_http.InferenceServerException, match="unknown model"):
            client.infer("other", [fp32])
    finally:
        client.close()
