"""This service against LitServe serving the plain backbone, both driven by ``hey``.

LitServe (a dev dependency, for this bench only) serves the artefacts' backbone with no exit at
all: ``dyce.artifacts.load_backbone``, the service's own image decoder (the same per-image work
as ours, so the comparison is about serving and early exit, not decoding), softmax and the top-5
labels; one inference worker, one API server, requests batched up to ``--max-batch-size``
images, ``--torch-threads`` like ours. ``dyce-serve`` runs pinned through the admin API, first to
the top tier, then to the cheapest tier within ``--max-drop`` of it (bench/serve.py's tiers), with
a latency objective no closed loop reaches, so it measures serving, not admission.

Load: ``--concurrency`` closed-loop clients, ``--clients-per-hey`` to a ``hey`` process; each
process sends its own Fashion-MNIST image(s), so the exits taken are a sample, not one image's.
Fewer processes load the host less (on 2 cores, 32 one-client processes cost this server about a
quarter of its requests/s against 4 processes of 8), more give a truer sample of exits: with 8
images per request, 4 processes send 32 distinct images, whose mean relative MACs at both tiers of
the demo bank are within 0.01 of the bank's; with 1, they send 4 images, which exit earlier than
the average (0.34 and 0.20 relative MACs against 0.51 and 0.35), so the 1-image figures flatter
early exit somewhat. One PNG per request as
multipart ``file`` (``/v1/classify``, LitServe's ``/predict``), then ``--images`` PNGs per request
as multipart ``files`` (``/v1/classify/batch``; LitServe's ``/predict`` with the same body, whole
requests batched up to the same number of images). Each phase runs ``--warmup`` seconds unmeasured,
then ``--seconds`` measured; latencies are hey's, at the client.

Last line: JSON with ``top_over_litserve_1img``, ``drop_over_litserve_1img``,
``drop_over_top_1img``, ``served_over_predicted_gain_8img`` (images/s drop over top with
``--images`` per request, over the bank's predicted gain), and per server and request size the
requests/s, images/s, p50/p95/p99 and non-200 answers; the load average before each phase and the
host (CPU flags, GPU). On a loaded host LitServe's processes starve first: measure on a quiet one.

Run: python bench/peers.py [--artifacts artifacts] [--seconds 10] [--concurrency 32]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import litserve as ls
import torch
import typer
from measure import print_rows
from rich.console import Console
from serving_harness import (
    ARTIFACTS,
    MAX_DROP,
    TORCH_THREADS,
    Body,
    cpu_summary,
    drop_tier,
    fashion_mnist_pngs,
    free_port,
    gpu_summary,
    hey,
    load_bank,
    measured_server,
    multipart,
)

from dyce.artifacts import ArtifactLayout, load_backbone
from service.edge.decode import ImageDecoder

console = Console(stderr=True)
OUT = Path(__file__).parent / "out"


# LitServe side ---------------------------------------------------------------------------------
class PlainBackbone(ls.LitAPI):
    """The artefacts' backbone, every image through every layer. Module level: LitServe pickles
    it into its inference worker."""

    def __init__(self, artifacts: Path, threads: int, **options: object) -> None:
        super().__init__(**options)
        self.artifacts, self.threads = artifacts, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.model, manifest = load_backbone(ArtifactLayout(self.artifacts))
        self.device = torch.device(device)  # LitServe's: "cpu", or "cuda:0" with accelerator "cuda"
        self.model.to(self.device).eval()
        self.labels = manifest.labels
        self.decoder = ImageDecoder(manifest.preprocess, 4096 * 4096, 8192, 16.0)
        self.sizes: list[int] = []

    def decode_request(self, request):  # a starlette FormData
        parts = [*request.getlist("file"), *request.getlist("files")]
        return torch.stack([self.decoder(part.file.read()) for part in parts])

    def batch(self, inputs):
        self.sizes = [x.shape[0] for x in inputs]
        return torch.cat(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return torch.softmax(self.model(x.to(self.device)), dim=1).cpu()

    def unbatch(self, output):
        return list(output.split(self.sizes))

    def encode_response(self, probabilities):
        top = torch.topk(probabilities, min(5, probabilities.shape[1]), dim=1)
        results = [
            {
                "predictions": [
                    {"label": self.labels[c], "class_index": c, "probability": p}
                    for p, c in zip(values, classes, strict=True)
                ]
            }
            for values, classes in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        return results[0] if len(results) == 1 else {"results": results}


def run_litserve(
    artifacts: Path, port: int, max_batch_requests: int, batch_timeout: float, threads: int, device: str
) -> None:
    """Runs in its own process (``--serve-litserve``): one API server, one inference worker, on
    ``device``'s kind (one GPU, as this service uses one)."""
    api = PlainBackbone(artifacts, threads, max_batch_size=max_batch_requests, batch_timeout=batch_timeout)
    accelerator = torch.device(device).type
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


class LitServeProcess:
    """``--serve-litserve`` in a session of its own: LitServe forks workers, the group is stopped."""

    def __init__(
        self, artifacts: Path, log_path: Path, max_batch_requests: int, batch_timeout: float, threads: int, device: str
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [
            sys.executable, __file__, "--serve-litserve", str(self.port), "--artifacts", str(artifacts),
            "--litserve-batch-requests", str(max_batch_requests), "--litserve-batch-timeout", str(batch_timeout),
            "--torch-threads", str(threads), "--device", device,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LitServeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"LitServe exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError("LitServe did not become ready")

    def __exit__(self, *_: object) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # LitServe's worker processes share the session: make sure none outlives the bench.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(
    artifacts: Path = ARTIFACTS,
    max_drop: float = MAX_DROP,
    seconds: float = typer.Option(10.0, help="measured duration of each phase"),
    warmup: float = typer.Option(3.0, help="unmeasured load before each phase"),
    concurrency: int = typer.Option(32, help="closed-loop clients"),
    clients_per_hey: int = typer.Option(8, help="clients per hey process, each process its own image(s)"),
    images: int = typer.Option(8, help="images per request in the second round"),
    max_batch_size: int = typer.Option(32, help="images per model call, both servers"),
    torch_threads: int = TORCH_THREADS,
    http_workers: int = typer.Option(0, help="this service's HTTP worker processes; 0 = its choice from the cores"),
    litserve_batch_timeout: float = typer.Option(
        0.005, help="LitServe's wait to fill a batch; 0 makes its worker poll its queue without sleeping"
    ),
    device: str = typer.Option(
        os.environ.get("DYCE_DEVICE", "cpu"), help="where both servers run the model: cpu, or cuda on a GPU host"
    ),
    serve_litserve: int = typer.Option(0, hidden=True),
    litserve_batch_requests: int = typer.Option(0, hidden=True),
) -> None:
    if serve_litserve:
        run_litserve(artifacts, serve_litserve, litserve_batch_requests, litserve_batch_timeout, torch_threads, device)
        return
    if shutil.which("hey") is None:
        console.print("this bench drives both servers with `hey`: apt-get install hey")
        raise typer.Exit(2)
    bank = load_bank(artifacts)
    top, drop = bank.most_accurate(), drop_tier(bank, max_drop)
    clients = [min(clients_per_hey, concurrency - start) for start in range(0, concurrency, clients_per_hey)]
    pngs = fashion_mnist_pngs(len(clients) * images)
    single = [multipart([png], "file") for png in pngs[: len(clients)]]
    batched = [multipart(pngs[i * images : (i + 1) * images], "files") for i in range(len(clients))]
    host = {"cpu": cpu_summary(), "gpu": gpu_summary()}
    console.print(f"host: {host}; load average {os.getloadavg()}")

    figures: dict[str, dict[str, float]] = {}
    loads: dict[str, tuple[float, float, float]] = {}

    def phase(name: str, url: str, bodies: list[Body], per_request: int) -> None:
        with tempfile.TemporaryDirectory(prefix="dyce-peers-") as scratch:
            hey(url, bodies, clients, warmup, Path(scratch), per_request)
            loads[name] = os.getloadavg()
            figures[name] = hey(url, bodies, clients, seconds, Path(scratch), per_request)
        console.print(f"{name}: {figures[name]}; load average before {loads[name]}")

    for per_request, bodies, suffix in ((1, single, "1img"), (images, batched, f"{images}img")):
        batch_requests = max(1, max_batch_size // per_request)
        log = OUT / f"peers-litserve-{suffix}.log"
        with LitServeProcess(artifacts, log, batch_requests, litserve_batch_timeout, torch_threads, device) as litserve:
            phase(f"litserve_{suffix}", f"{litserve.url}/predict", bodies, per_request)

    server_log = OUT / "peers-server.log"
    with measured_server(artifacts, server_log, torch_threads, max_batch_size, http_workers, device) as server:
        for tier, index in (("top", top), ("drop", drop)):
            server.pin(index)
            phase(f"{tier}_1img", f"{server.url}/v1/classify", single, 1)
            phase(f"{tier}_{images}img", f"{server.url}/v1/classify/batch", batched, images)

    rows = [
        {"phase": name, **{k: f"{v:.1f}" for k, v in f.items()}, "load": f"{loads[name][0]:.2f}"}
        for name, f in figures.items()
    ]
    print_rows(console, f"{concurrency} clients (hey), {artifacts}", rows)

    def ratio(a: str, b: str) -> float:
        return figures[a]["images_per_s"] / figures[b]["images_per_s"]

    many = f"{images}img"
    predicted_gain = bank.entries[top].search.relative_macs / bank.entries[drop].search.relative_macs
    result = {
        "top_over_litserve_1img": ratio("top_1img", "litserve_1img"),
        "drop_over_litserve_1img": ratio("drop_1img", "litserve_1img"),
        "drop_over_top_1img": ratio("drop_1img", "top_1img"),
        f"served_over_predicted_gain_{many}": ratio(f"drop_{many}", f"top_{many}") / predicted_gain,
        f"top_over_litserve_{many}": ratio(f"top_{many}", f"litserve_{many}"),
        f"drop_over_litserve_{many}": ratio(f"drop_{many}", f"litserve_{many}"),
        "predicted_gain": predicted_gain,
        "figures": figures,
        "load_before": loads,
        "load_after": os.getloadavg(),
        "concurrency": concurrency,
        "hey_processes": len(clients),
        "images_per_request": images,
        "seconds": seconds,
        "top_index": top,
        "drop_index": drop,
        "max_batch_size": max_batch_size,
        "torch_threads": torch_threads,
        "http_workers": http_workers,
        "device": device,
        "litserve_batch_timeout_s": litserve_batch_timeout,
        "host": host,
        "artifacts": str(artifacts),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
