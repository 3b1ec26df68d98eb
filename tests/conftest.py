"""Shared fixtures: real Fashion-MNIST images, a small artefact set built with the core only,
and a real uvicorn server on a loopback port."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from dyce.artifacts import ArtifactLayout, backbone_identity, save_backbone, save_exits
from dyce.backbones import build_backbone
from dyce.bank import Bank, BankEntry, SplitMetrics
from dyce.config import ExitConfiguration
from dyce.exits import ExitSet
from dyce.macs import measure_macs
from dyce.preprocess import FASHION_MNIST
from dyce.simulate import simulate
from offline.data import read_idx
from tests.core_helpers import quantile_config, records_for

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def fmnist_test_images() -> tuple[np.ndarray, np.ndarray]:
    """The first 1000 real Fashion-MNIST test images (uint8 28x28) and labels."""
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:1000]
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:1000].astype(np.int64)
    return images, labels


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def fmnist_pngs(fmnist_test_images) -> list[bytes]:
    return [png_bytes(image) for image in fmnist_test_images[0][:200]]


# Threshold plans (position -> (candidate k, confidence quantile)) for the hand-made bank: from
# everything leaving at the first exit to the plain model, so the tiers differ a lot in cost.
CORE_BANK_PLANS: tuple[dict[int, tuple[int, float]], ...] = (
    {0: (1, 0.0)},
    {0: (2, 0.6), 4: (1, 0.3)},
    {2: (2, 0.6), 6: (1, 0.2)},
    {4: (2, 0.7)},
    {6: (1, 0.8)},
    {},
)
CORE_BANK_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
CORE_EXIT_POSITIONS = (0, 2, 4, 6)


def _normalised(images: np.ndarray) -> torch.Tensor:
    return torch.stack([FASHION_MNIST.transform()(Image.fromarray(image)) for image in images])


def _fit_probes(backbone, exits, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Train the final classifier and every exit on the frozen random-weight features.

    A random conv stack with trained linear/MLP read-outs reaches ~65% (first block) to ~79%
    (plain model) on Fashion-MNIST: real data, accuracy that grows with depth, a few seconds of
    CPU. Exits only see pooled features (their ``mlp``), as the offline toolchain trains them.
    """
    readouts = [(backbone.num_positions - 1, backbone.model.fc, 150, 1e-2)]
    readouts += [(n, exit_.mlp, 150 if k == 0 else 40, 1e-2 if k == 0 else 2e-3)
                 for n in CORE_EXIT_POSITIONS for k, exit_ in enumerate(exits.candidates[n])]  # fmt: skip
    with torch.no_grad():
        pooled, x = [], images
        for segment in backbone.segments:
            x = segment(x)
            pooled.append(x.mean(dim=(2, 3)))
    for position, module, steps, lr in readouts:
        optimiser = torch.optim.Adam(module.parameters(), lr)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(module(pooled[position]), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    backbone.eval()
    exits.eval()


def build_core_demo_artifacts(root: Path, num_train: int = 1000, num_records: int = 400) -> Path:
    """A small artefact set built with the core only: resnet18_fmnist with fixed random conv
    weights and trained read-outs, exits of two kinds, and a hand-made bank. It stands in until
    the offline toolchain's demo build is used by the tests.

    Each lambda of the bank gets the hand-made plan that minimises the paper's eq. 12 on
    records of held-out real images; metrics come from ``dyce.simulate`` on those records.
    """
    torch.manual_seed(0)
    layout = ArtifactLayout(root)
    backbone = build_backbone("resnet18_fmnist")
    channels = [shape[0] for shape in backbone.position_shapes()]
    exits = ExitSet.build(channels, backbone.num_classes, ("mlp1", "mlp3x500"), positions=CORE_EXIT_POSITIONS)
    train_images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:num_train]
    train_labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:num_train].astype(np.int64)
    with torch.enable_grad():
        _fit_probes(backbone, exits, _normalised(train_images), torch.as_tensor(train_labels))
    macs = measure_macs(backbone, exits)
    # Held out from both the training images and the requests the tests send (the first test images).
    held_out = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[-num_records:]
    held_out_labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[-num_records:].astype(np.int64)
    records = records_for(backbone, exits, _normalised(held_out), held_out_labels)
    configs = [
        quantile_config(records, plan) if plan else ExitConfiguration.final_only(backbone.num_positions)
        for plan in CORE_BANK_PLANS
    ]
    results = [simulate(records, config, macs) for config in configs]

    def objective(i: int, lam: float) -> float:
        return lam * (1 - results[i].relative_accuracy) + (1 - lam) * results[i].relative_macs

    chosen: dict[int, float] = {}
    for lam in CORE_BANK_LAMBDAS:
        chosen.setdefault(min(range(len(configs)), key=lambda i: objective(i, lam)), lam)
    entries = []
    for i, lam in sorted(chosen.items(), key=lambda item: item[1]):
        r = results[i]
        others = [results[j] for j in chosen if j != i]
        dominated = any(
            o.accuracy >= r.accuracy
            and o.relative_macs <= r.relative_macs
            and (o.accuracy > r.accuracy or o.relative_macs < r.relative_macs)
            for o in others
        )
        metrics = SplitMetrics(
            accuracy=r.accuracy,
            relative_accuracy=r.relative_accuracy,
            relative_macs=r.relative_macs,
            exit_rates=tuple(r.exit_rates.tolist()),
        )
        entries.append(
            BankEntry(lam=lam, algorithm="hand-made", config=configs[i], search=metrics, dominated=dominated)
        )
    backbone_manifest = save_backbone(layout, backbone, list(FASHION_MNIST_LABELS), FASHION_MNIST)
    exit_manifest = save_exits(layout, exits, backbone_identity(backbone))
    Bank(
        backbone=backbone_manifest.identity,
        exits=tuple(exit_manifest.identities()),
        num_candidates=tuple(exits.num_candidates),
        macs=macs,
        original_accuracy={"search": records.original_accuracy},
        entries=tuple(entries),
    ).save(layout.bank)
    return root


@pytest.fixture(scope="session")
def core_demo_artifacts(tmp_path_factory) -> Path:
    return build_core_demo_artifacts(tmp_path_factory.mktemp("core-demo-artifacts"))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """``create_app`` under a real uvicorn server on a loopback port, in a background thread."""

    def __init__(self, settings) -> None:
        from service import create_app
        from service.edge.protocol import uvicorn_config

        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The edge (protocol limits, JSON errors) as dyce-serve configures it, on a free port.
        config = uvicorn_config(self.app, settings, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def engine(self):
        return self.app.state.engine

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token.get_secret_value()}"}


def service_settings(artifacts: Path, **overrides):
    from service import Settings

    values = {"artifacts_dir": artifacts, "admin_token": ADMIN_TOKEN, "max_batch_size": 16, "calibration_rounds": 2}
    return Settings(**(values | overrides))


@pytest.fixture(scope="session")
def live_server(core_demo_artifacts) -> Iterator[LiveServer]:
    """One shared server for tests that leave it as they found it (pinned at the top tier).
    Admission is not what these tests check: a generous objective, so a loaded host sees no 429."""
    with LiveServer(service_settings(core_demo_artifacts, autoswitch="manual", slo_p95_ms=60_000)) as server:
        yield server


@pytest.fixture
def client(live_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(
        value for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )  # fmt: skip


def worker_processes(pid: int) -> list[int]:
    """Worker processes of the server: its children that run multiprocessing's spawn entry."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


class DyceServeProcess:
    """``python -m service`` as production runs it, here with 2 HTTP worker processes in front of
    the engine process (``DYCE_HTTP_WORKERS``), on a free loopback port."""

    workers = 2

    def __init__(self, artifacts: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DYCE_ARTIFACTS_DIR": str(artifacts),
            "DYCE_ADMIN_TOKEN": ADMIN_TOKEN,
            "DYCE_PORT": str(self.port),
            "DYCE_HTTP_WORKERS": str(self.workers),
            "DYCE_MAX_BATCH_SIZE": "16",
            "DYCE_CALIBRATION_ROUNDS": "2",
            "DYCE_AUTOSWITCH": "manual",
            "DYCE_SLO_P95_MS": "60000",
            **env,
        }
        self.process: subprocess.Popen[str] | None = None
        # A file, not a pipe: a pipe nobody reads would block the server once its logs fill it.
        self.log = tempfile.TemporaryFile("w+")

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def __enter__(self) -> DyceServeProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"], env=self.env, cwd=ROOT, stderr=self.log, text=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.logs()
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the multi-process server did not become ready")
        # every worker process must have started (ready above means at least one answers)
        while len(worker_processes(self.process.pid)) < self.workers and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(worker_processes(self.process.pid)) == self.workers, "the HTTP workers did not start"
        return self

    def stop(self) -> tuple[int, str]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        return self.process.returncode, self.logs()

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # as an orchestrator stops it: workers and run dir go too
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
