"""Several HTTP worker processes in front of one engine process (DYCE_HTTP_WORKERS=2), run as
``dyce-serve`` runs in production: a real subprocess, real sockets, real worker processes.

What must hold across processes, each checked against something the server does not compute:
answers equal the plain model run by hand at the tier the admin chose; a switch holds for every
worker at once; /metrics counts every request whichever worker answered it; the engine's
admission (429) and tier errors (422) reach the client as they do from one process; a killed
worker is replaced; SIGTERM ends everything with status 0 and leaves no metric files behind.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton_http

from service import Settings
from service.edge.decode import ImageDecoder
from service.engine.model import ModelRuntime
from service.engine.remote import _frame, _pack, _unpack
from service.multiprocess import prepare_run_dir
from tests.conftest import ADMIN_TOKEN, DyceServeProcess, worker_processes

WORKERS = DyceServeProcess.workers


def _each_on_a_new_connection(url: str, pngs: list[bytes], **params: object) -> list[httpx.Response]:
    """One connection per request, so the kernel hands requests to different workers."""
    return [
        httpx.post(f"{url}/v1/classify", content=png, headers={"content-type": "image/png"}, params=params, timeout=30)
        for png in pngs
    ]


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.fixture(scope="module")
def server(core_demo_artifacts) -> Iterator[DyceServeProcess]:
    with DyceServeProcess(core_demo_artifacts) as running:
        yield running


@pytest.fixture(scope="module")
def reference(core_demo_artifacts):
    settings = Settings(artifacts_dir=core_demo_artifacts, admin_token=ADMIN_TOKEN)
    runtime = ModelRuntime(settings)
    return runtime, ImageDecoder.from_settings(runtime.preprocess, settings)


def test_workers_are_separate_processes_around_one_engine(server):
    workers = worker_processes(server.process.pid)
    assert len(workers) == WORKERS, workers


def test_a_switch_holds_for_every_worker_and_answers_equal_the_model_run_by_hand(server, reference, fmnist_pngs):
    runtime, decoder = reference
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    bank = runtime.initial_bank
    for index in (bank.frontier()[0], bank.most_accurate()):
        switched = httpx.post(f"{server.url}/admin/active", json={"index": index}, headers=admin, timeout=30)
        assert switched.status_code == 200, switched.text
        answers = _each_on_a_new_connection(server.url, fmnist_pngs[:24])
        config = bank.entries[index].config
        for png, response in zip(fmnist_pngs[:24], answers, strict=True):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["tier"]["bank_index"] == index
            expected = runtime.run(decoder(png).unsqueeze(0), config)
            assert body["exit_position"] == int(expected.exit_positions[0])
            assert body["predictions"][0]["class_index"] == int(expected.probabilities[0].argmax())
            # The server lays each segment out as timed fastest at warm-up; kernels of the two
            # layouts round differently (~1e-6), which moves no exit decision.
            assert body["predictions"][0]["probability"] == pytest.approx(
                float(expected.probabilities[0].max()), abs=1e-5
            )
        # every worker reads the same active tier
        for _ in range(2 * WORKERS):
            active = httpx.get(f"{server.url}/admin/active", headers=admin, timeout=30).json()
            assert active["tier"]["bank_index"] == index and active["mode"] == "manual"


def test_a_batch_crosses_the_channel_row_for_row(server, reference, fmnist_pngs):
    """Eight images in one Open Inference Protocol request, through a worker and the engine: every
    row's probabilities, exit position and cost equal the plain model run by hand on the batch."""
    runtime, decoder = reference
    bank = runtime.initial_bank
    batch = torch.stack([decoder(png) for png in fmnist_pngs[:8]])
    # A tier at which these images leave at several positions, so rows are answered apart.
    index = next(i for i in bank.frontier() if len(set(runtime.run(batch, bank.entries[i].config).exit_positions)) > 1)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(f"{server.url}/admin/active", json={"index": index}, headers=admin, timeout=30).is_success
    client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        fp32 = triton_http.InferInput("input", list(batch.shape), "FP32")
        fp32.set_data_from_numpy(batch.numpy(), binary_data=True)
        result = client.infer("dyce", [fp32])
    finally:
        client.close()
    expected = runtime.run(batch, bank.entries[index].config)
    positions = result.as_numpy("exit_position")
    np.testing.assert_array_equal(positions, np.asarray(expected.exit_positions))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected.probabilities.numpy(), atol=1e-5)
    costs = bank.macs.path_costs(bank.entries[index].config)
    np.testing.assert_allclose(result.as_numpy("relative_macs"), costs[positions], rtol=1e-6)


def test_arrays_cross_the_channel_as_their_bytes():
    """The channel's array codec, through the pickle a frame carries: values, dtype and shape come
    back as sent, from any layout, and writable (``torch.from_numpy`` takes them without a copy)."""
    grid = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    arrays = [grid[:, ::2, :, 1:], np.asfortranarray(grid[0]), np.array([3, -1, 7]), np.zeros((0, 10)), np.float64(2.5)]
    for array in arrays:
        frame = _frame(("answer", 1, _pack(array)))
        back = _unpack(pickle.loads(frame[4:])[2])
        assert back.dtype == array.dtype and back.shape == np.shape(array)
        np.testing.assert_array_equal(back, array)
        assert back.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.from_numpy(back)


def test_metrics_count_every_request_whichever_worker_answered(server, fmnist_pngs):
    before = httpx.get(f"{server.url}/metrics", timeout=30).text
    sent = 30
    answers = _each_on_a_new_connection(server.url, fmnist_pngs[:sent])
    assert all(r.status_code == 200 for r in answers)
    scrapes = [httpx.get(f"{server.url}/metrics", timeout=30).text for _ in range(2 * WORKERS)]
    for after in scrapes:  # any worker's scrape reports the whole server
        counted = _metric(after, "dyce_requests_total", route="/v1/classify", status="200") - _metric(
            before, "dyce_requests_total", route="/v1/classify", status="200"
        )
        assert counted == sent
        exits = _metric(after, "dyce_exits_total") - _metric(before, "dyce_exits_total")
        assert exits == sent  # the engine's count, one per image
        assert _metric(after, "dyce_model_ready") == 1
        assert _metric(after, "dyce_in_flight_requests") >= 1  # the scrape itself


def test_engine_refusals_cross_the_channel_as_json(core_demo_artifacts, fmnist_pngs):
    with DyceServeProcess(core_demo_artifacts, DYCE_QUEUE_CAPACITY_IMAGES="4") as server:
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(fmnist_pngs[:8])]
        full = httpx.post(f"{server.url}/v1/classify/batch", files=files, timeout=30)
        assert full.status_code == 429 and full.json()["code"] == "queue_full"
        assert full.headers["retry-after"] == "1"
        too_cheap = httpx.post(
            f"{server.url}/v1/classify",
            content=fmnist_pngs[0],
            headers={"content-type": "image/png"},
            params={"max_relative_macs": 1e-9},
            timeout=30,
        )
        assert too_cheap.status_code == 422 and too_cheap.json()["code"] == "invalid"
        fine = httpx.post(
            f"{server.url}/v1/classify", content=fmnist_pngs[0], headers={"content-type": "image/png"}, timeout=30
        )
        assert fine.status_code == 200

        # a worker killed outright is replaced, and the server keeps answering meanwhile
        victim = worker_processes(server.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = worker_processes(server.process.pid)
            if victim not in workers and len(workers) == WORKERS:
                break
            time.sleep(0.2)
        assert victim not in workers and len(workers) == WORKERS
        answers = _each_on_a_new_connection(server.url, fmnist_pngs[:10])
        assert [r.status_code for r in answers] == [200] * 10

        status, stderr = server.stop()
        assert status == 0, stderr
        assert "Traceback" not in stderr, stderr
        metrics_dir = re.search(r"metric files in (\S+)", stderr)
        assert metrics_dir is not None, stderr
        assert not Path(metrics_dir.group(1)).exists()


def test_process_count_follows_the_cores_unless_set():
    settings = Settings(admin_token=ADMIN_TOKEN)
    assert settings.http_processes(cores=1) == 1
    assert settings.http_processes(cores=2) == 2
    assert settings.http_processes(cores=4) == 2
    assert settings.http_processes(cores=16) == 4
    assert settings.http_processes(cores=128) == 8
    assert Settings(admin_token=ADMIN_TOKEN, device="cuda").http_processes(cores=16) == 8
    assert Settings(admin_token=ADMIN_TOKEN, http_workers=3).http_processes(cores=2) == 3


def test_a_worker_holds_at_most_the_byte_capacity_before_the_engine_admits():
    """Decoded images wait in a worker until the engine admits them: by hand, 28x28 grey images
    are 4 * 784 = 3136 bytes decoded, plus their encoded bytes."""
    from dyce.preprocess import FASHION_MNIST
    from service.engine.api import ModelInfo
    from service.engine.remote import RemoteEngine
    from service.errors import QueueFull

    remote = RemoteEngine(Settings(admin_token=ADMIN_TOKEN, queue_capacity_bytes=10_000), "/nonexistent")
    remote._apply(("state", ModelInfo(("a", "b"), (1, 28, 28), 3, FASHION_MNIST), True, None))
    with remote.admission(2, 100):  # 2 * 3136 + 100 = 6372 held
        with pytest.raises(QueueFull) as refused, remote.admission(1, 1000):  # 6372 + 4136 > 10000
            pass
        assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1"
        with remote.admission(1, 100):  # 6372 + 3236 = 9608 fits
            pass
    with remote.admission(3, 0):  # 9408: the first request's room came back
        pass


def test_cgroup_cpu_quota_caps_the_cores(tmp_path):
    """A container's CPU limit, as cgroup v2 and v1 write it (files made here, by hand)."""
    from service.settings import _cgroup_cpu_quota

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert _cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")  # 2 CPUs
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpu_quota(v1) is None
    assert _cgroup_cpu_quota(tmp_path / "none") is None


def test_a_new_supervisor_removes_run_directories_whose_owner_is_gone(tmp_path, monkeypatch):
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid no longer runs: as a supervisor that was SIGKILLed

    def run_dir(name: str, owner: int | None) -> Path:
        path = tmp_path / f"dyce-{name}"
        (path / "metrics").mkdir(parents=True)
        (path / "metrics" / "counter_1.db").write_bytes(b"\0" * 1024)
        if owner is not None:
            (path / "owner.pid").write_text(str(owner))
        return path

    stale, alive, unnamed = run_dir("stale", gone.pid), run_dir("alive", os.getpid()), run_dir("new", None)
    unrelated = tmp_path / "not-a-run-dir"
    unrelated.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "restored-after-the-test")

    fresh = prepare_run_dir(tmp_path)

    assert not stale.exists()
    assert alive.exists() and unnamed.exists() and unrelated.exists()
    assert (fresh / "owner.pid").read_text() == str(os.getpid())
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(fresh / "metrics")
