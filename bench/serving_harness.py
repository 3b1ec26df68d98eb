"""Shared by the serving benches: run ``dyce-serve`` in its own process, real images, tiers."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import typer
from PIL import Image

from dyce.artifacts import ArtifactLayout, load_bank_for
from dyce.bank import Bank
from offline.data import read_idx

FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def fashion_mnist_pngs(count: int) -> list[bytes]:
    """The first ``count`` real Fashion-MNIST test images, PNG-encoded as a client would send them."""
    images = read_idx(FASHION_MNIST_TEST)[:count]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def load_bank(artifacts: Path) -> Bank:
    return load_bank_for(ArtifactLayout(artifacts))


def drop_tier(bank: Bank, max_drop: float) -> int:
    """Cheapest entry whose expected accuracy is within ``max_drop`` (relative) of the best entry."""
    best = bank.entries[bank.most_accurate()].search.accuracy
    return bank.reaching_accuracy(best * (1 - max_drop))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m service`` with ``DYCE_*`` settings, started and stopped by its pid."""

    def __init__(self, artifacts: Path, log_path: Path, **settings: object) -> None:
        self.log_path = log_path
        self.token = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DYCE_ARTIFACTS_DIR": str(artifacts),
            "DYCE_ADMIN_TOKEN": self.token,
            "DYCE_PORT": str(self.port),
            **{f"DYCE_{key.upper()}": str(value) for key, value in settings.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: a pipe nobody reads fills up and blocks the server's logging.
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dyce-serve exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise TimeoutError("dyce-serve did not become ready")

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def admin(self, method: str, path: str, **kwargs: object) -> dict:
        response = httpx.request(method, f"{self.url}{path}", headers=self.admin_headers, timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def pin(self, index: int) -> dict:
        return self.admin("POST", "/admin/active", json={"index": index})


# Options the serving benches share, so the same flag means the same thing in each.
ARTIFACTS = typer.Option(Path("artifacts"), help="artefacts built by `dyce-offline build`")
MAX_DROP = typer.Option(0.005, help="accuracy drop (relative to the best entry) of the cheaper tier")
TORCH_THREADS = typer.Option(1, help="intra-op threads, in every process that runs the model")


def measured_server(
    artifacts: Path,
    log_path: Path,
    torch_threads: int,
    max_batch_size: int,
    http_workers: int = 0,
    device: str | None = None,
) -> ServerProcess:
    """``dyce-serve`` as the throughput benches run it: tiers pinned by hand, a deep queue, and a
    latency objective no closed loop reaches, so it measures serving, not admission (which
    applies to pinned tiers too). ``device``: ``DYCE_DEVICE`` (None: the environment's, else cpu)."""
    settings = {"autoswitch": "manual", "queue_capacity": 4096, "slo_p95_ms": 60_000, "http_workers": http_workers}
    if device is not None:
        settings["device"] = device
    return ServerProcess(artifacts, log_path, torch_threads=torch_threads, max_batch_size=max_batch_size, **settings)


def cpu_summary() -> dict[str, object]:
    flags: set[str] = set()
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and model == "unknown":
                model = value.strip()
    return {"model": model, "cores": os.cpu_count(), **{flag: flag in flags for flag in CPU_FLAGS}}


def gpu_summary() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def host_and_load(load_before: tuple[float, float, float]) -> dict[str, object]:
    """What a bench's JSON line ends with, so runs compare across hosts: the load average before
    and after the run, the CPU's flags and the GPU."""
    return {
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "host": {"cpu": cpu_summary(), "gpu": gpu_summary()},
    }


class CpuMeter:
    """CPU time under load, split by where it went: the server's main process (its main thread,
    and its other threads: the engine's inference thread), its child processes (the HTTP
    workers) and the rest of the machine (the load generator, this bench). From /proc, so a
    figure says whether the engine, the edge or the client ran out of CPU, or nothing did."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid

    @classmethod
    def _seconds(cls, stat_path: str, reaped_children: bool = False) -> float:
        """utime + stime (a process's covers every thread it ran, ended ones too); with
        ``reaped_children``, cutime + cstime instead: its children that have exited."""
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
        first = 13 if reaped_children else 11
        return (int(fields[first]) + int(fields[first + 1])) / cls.TICK

    @classmethod
    def _machine_busy(cls) -> float:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(values) - values[3] - values[4]) / cls.TICK  # all but idle and iowait

    def snapshot(self) -> dict[str, float]:
        process = self._seconds(f"/proc/{self.pid}/stat")
        main_thread = self._seconds(f"/proc/{self.pid}/task/{self.pid}/stat")
        children = self._seconds(f"/proc/{self.pid}/stat", reaped_children=True)
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            live: list[str] = []
            with contextlib.suppress(OSError):  # a thread that just ended
                live = (task / "children").read_text().split()
            for child in live:
                with contextlib.suppress(OSError):  # a child that just ended
                    children += self._seconds(f"/proc/{child}/stat")
        return {
            "wall": time.perf_counter(),
            "server_main_thread": main_thread,
            "server_other_threads": process - main_thread,
            "server_children": children,
            "machine": self._machine_busy(),
        }

    @staticmethod
    def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
        """CPU ms per answered request of each part, and how many cores the machine kept busy."""
        delta = {key: after[key] - before[key] for key in before}
        own = delta["server_main_thread"] + delta["server_other_threads"] + delta["server_children"]
        per = {
            key: delta[key] / max(requests, 1) * 1e3
            for key in ("server_main_thread", "server_other_threads", "server_children")
        }
        per["rest_of_machine"] = (delta["machine"] - own) / max(requests, 1) * 1e3
        per["busy_cores"] = delta["machine"] / delta["wall"]
        return per


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1e3) if seconds else float("nan")


# Load ------------------------------------------------------------------------------------------
Body = tuple[bytes, str, dict[str, str]]  # content, content type, other headers


def multipart(pngs: list[bytes], field: str) -> Body:
    """PNGs as one multipart body, encoded once so the load generator only sends bytes."""
    files = [(field, (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    request = httpx.Request("POST", "http://x/", files=files)
    return request.read(), request.headers["content-type"], {}


def hey(url: str, bodies: list[Body], clients: list[int], seconds: float, scratch: Path, images: int) -> dict:
    """One ``hey`` per body with its number of closed-loop clients, all at once; figures from their
    CSVs. A Go load generator: one Python process cannot drive these rates, and on a small host
    its own CPU would be taken from the server it measures."""
    procs = []
    for i, ((content, content_type, headers), count) in enumerate(zip(bodies, clients, strict=True)):
        path = scratch / f"body-{i}.bin"
        path.write_bytes(content)
        command = ["hey", "-z", f"{seconds:g}s", "-c", str(count), "-t", "30", "-m", "POST", "-T", content_type]
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        procs.append(subprocess.Popen([*command, "-D", str(path), "-o", "csv", url], stdout=subprocess.PIPE))
    latencies, starts, ends, failed = [], [], [], 0
    for proc in procs:
        out, _ = proc.communicate()
        for row in csv.DictReader(io.StringIO(out.decode())):
            elapsed, offset = float(row["response-time"]), float(row["offset"])
            starts.append(offset)
            ends.append(offset + elapsed)
            if row["status-code"] == "200":
                latencies.append(elapsed)
            else:
                failed += 1
    span = max(ends) - min(starts) if ends else float("nan")
    pct = (lambda q: float(np.percentile(latencies, q) * 1e3)) if latencies else (lambda q: float("nan"))
    return {
        "requests_per_s": len(latencies) / span,
        "images_per_s": len(latencies) * images / span,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "non_200": failed,
        "requests": len(latencies),
    }
