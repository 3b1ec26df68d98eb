"""Admin routes and live switching, on a server of their own (they change its state)."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import pytest

from dyce.artifacts import ArtifactLayout
from dyce.bank import Bank
from service.edge.decode import ImageDecoder
from tests.conftest import LiveServer, service_settings


@pytest.fixture(scope="module")
def admin_server(core_demo_artifacts, tmp_path_factory):
    # Admission is not under test here: a generous objective, so a loaded CI host sees no 429.
    with LiveServer(service_settings(core_demo_artifacts, autoswitch="manual", slo_p95_ms=60_000)) as server:
        yield server


@pytest.fixture
def admin(admin_server):
    with httpx.Client(base_url=admin_server.url, headers=admin_server.admin(), timeout=30) as client:
        yield client


def test_admin_needs_the_bearer_token(admin_server):
    with httpx.Client(base_url=admin_server.url) as client:
        missing = client.get("/admin/active")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["code"] == "unauthorized"
        wrong = client.get("/admin/active", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403 and wrong.json()["code"] == "forbidden"
        assert client.post("/admin/active", json={"index": 0}, headers={"Authorization": "Basic x"}).status_code == 401


def test_list_bank_and_switch_by_every_selector(admin, admin_server):
    bank = admin.get("/admin/bank").json()
    entries = bank["entries"]
    assert len(entries) >= 3 and sum(e["active"] for e in entries) == 1
    cheapest = min(entries, key=lambda e: e["expected_relative_macs"])
    best = max(entries, key=lambda e: (e["expected_accuracy"], -e["expected_relative_macs"]))

    switched = admin.post("/admin/active", json={"lambda": cheapest["lambda"]}).json()
    assert switched["tier"]["bank_index"] == cheapest["bank_index"] and switched["mode"] == "manual"
    assert switched["reason"] == "admin"
    assert admin.get("/admin/active").json()["tier"]["config_id"] == cheapest["config_id"]

    by_index = admin.post("/admin/active", json={"index": best["bank_index"]}).json()
    assert by_index["tier"]["bank_index"] == best["bank_index"]
    budget = admin.post("/admin/active", json={"max_relative_macs": cheapest["expected_relative_macs"] + 1e-9}).json()
    assert budget["tier"]["bank_index"] == cheapest["bank_index"]
    floor = admin.post("/admin/active", json={"min_accuracy": best["expected_accuracy"]}).json()
    assert floor["tier"]["expected_accuracy"] >= best["expected_accuracy"]

    assert admin.post("/admin/active", json={"index": 99}).status_code == 404
    assert admin.post("/admin/active", json={"min_accuracy": 1.0, "index": 0}).status_code == 400
    assert admin.post("/admin/active", json={"max_relative_macs": 1e-9}).status_code == 422
    assert admin.post("/admin/active", json={"colour": "red"}).status_code == 422
    assert admin.post("/admin/mode", json={"mode": "auto"}).json()["mode"] == "auto"
    assert admin.post("/admin/mode", json={"mode": "manual"}).json()["mode"] == "manual"
    assert admin.post("/admin/mode", json={"mode": "sometimes"}).status_code == 422


def test_reload_rejects_a_bad_bank_and_keeps_serving_the_old_one(admin, admin_server, core_demo_artifacts, fmnist_pngs):
    layout = ArtifactLayout(core_demo_artifacts)
    before = admin.get("/admin/active").json()
    (core_demo_artifacts / "broken.json").write_text("{not json")
    foreign = json.loads(layout.bank.read_text())
    foreign["backbone"]["weights_sha256"] = "0" * 64
    (core_demo_artifacts / "foreign.json").write_text(json.dumps(foreign))
    for path, expected in (("broken.json", 422), ("foreign.json", 422), ("missing.json", 404), ("../bank.json", 400)):
        response = admin.post("/admin/bank/reload", json={"path": path})
        assert response.status_code == expected, response.text
        assert "error" in response.json()
    assert "searched for backbone" in admin.post("/admin/bank/reload", json={"path": "foreign.json"}).json()["error"]
    assert admin.get("/admin/active").json() == before
    ok = admin.post("/v1/classify", content=fmnist_pngs[0], headers={"content-type": "image/png"})
    assert ok.status_code == 200 and ok.json()["tier"]["config_id"] == before["tier"]["config_id"]

    # A valid bank with fewer entries replaces the old one whole, at the nearest lambda.
    bank = Bank.load(layout.bank)
    smaller = bank.model_copy(update={"entries": bank.entries[:2]})
    smaller.save(core_demo_artifacts / "smaller.json")
    reloaded = admin.post("/admin/bank/reload", json={"path": "smaller.json"})
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["reason"] == "reload"
    assert len(admin.get("/admin/bank").json()["entries"]) == 2
    assert admin.post("/admin/bank/reload").status_code == 200  # default: bank.json again
    assert len(admin.get("/admin/bank").json()["entries"]) == len(bank.entries)


def test_live_switching_under_concurrent_requests(admin, admin_server, fmnist_pngs):
    """While an operator flips tiers, every answer is consistent with exactly one configuration."""
    bank = admin_server.engine.state.bank
    runtime = admin_server.engine.runtime
    indices = [e["bank_index"] for e in admin.get("/admin/bank").json()["entries"]]
    stop = threading.Event()

    def flip() -> int:
        flips = 0
        while not stop.is_set():
            assert admin.post("/admin/active", json={"index": indices[flips % len(indices)]}).status_code == 200
            flips += 1
        return flips

    def classify(png: bytes) -> dict:
        with httpx.Client(base_url=admin_server.url, timeout=30) as client:
            response = client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
            return response.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flipper = pool.submit(flip)
        answers = list(pool.map(classify, fmnist_pngs[:120]))
        stop.set()
        assert flipper.result() > 3
    seen = {a["tier"]["bank_index"] for a in answers}
    assert len(seen) >= 2, "the switches did not overlap the requests"
    decoder = ImageDecoder.from_settings(runtime.preprocess, admin_server.settings)
    for png, answer in zip(fmnist_pngs[:120], answers, strict=True):
        config = bank.entries[answer["tier"]["bank_index"]].config
        assert config.config_id == answer["tier"]["config_id"]
        expected = runtime.run(decoder(png).unsqueeze(0), config)
        assert answer["exit_position"] == int(expected.exit_positions[0])
        assert answer["relative_macs"] == pytest.approx(float(expected.relative_macs[0]))
        assert answer["predictions"][0]["class_index"] == int(expected.probabilities[0].argmax())
