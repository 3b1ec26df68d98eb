"""HTTP serving vs the bare executor, for the top tier and a <= 0.5%-drop tier of a bank.

In-process baseline: the service's own decoder and ``EarlyExitExecutor.run`` (same artefacts,
same torch threads). Served: ``dyce-serve`` in its own process, pinned to each tier through the
admin API, with real Fashion-MNIST PNGs:

* batch 1: sequential requests on one keep-alive connection; overhead = served p50 - bare p50
  (bare = decode + executor for one image); ``http_floor_p50_ms`` is an empty GET's round trip
  on the same client, the part of the overhead that any HTTP request pays on this machine;
  ``overhead_p50_ms_over_idle_bare`` takes the bare path after a 2 ms pause instead, as each of
  the server's processes runs it between sequential requests (a sleeping vCPU wakes slower);
* under load: ``--concurrency`` closed-loop ``hey`` clients (``--clients-per-hey`` to a process,
  each process its own request; a Go client, so the load generator takes less of the CPU it
  shares with the server than a Python one would) for ``--seconds``, each posting
  ``--images-per-request`` images to ``/v1/classify/batch`` (with one image per request this
  tiny model is HTTP-bound and every tier serves alike); throughput in images/s, against the
  bare executor (``run`` on batches of the server's max batch size) and the in-process
  continuous-batching pipeline that the server drives.

Where the served gain goes: ``engine_closed_loop`` drives the server's own batcher in this
process with the same clients and images and nothing else (no HTTP, no channel, no load
generator sharing the CPU); and during each served load phase ``CpuMeter`` splits the CPU
spent per request between the server's main thread, its other threads (the engine's inference
thread), its child processes (the HTTP workers) and the rest of the machine (the load
generator), with how many cores were busy: a bottleneck shows as a part near one core.

served gain = throughput(drop tier) / throughput(top tier) under load, the median over
``--rounds`` rounds that alternate the tiers (each round's own ratio, so a drift of a noisy
host's speed cancels); predicted gain = the bank's expected relative MACs, top / drop. Last
line: JSON with ``overhead_p50_ms`` and ``served_over_predicted_gain`` (and the rest of the
figures, with each round's in ``*_runs``; ``engine_closed_loop_over_predicted_gain`` and
``served_over_engine_closed_loop_gain`` split the second into the engine's part and the edge's).

Run: python bench/serve.py [--artifacts artifacts] [--max-drop 0.005] [--seconds 6]
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table
from serving_harness import (
    ARTIFACTS,
    MAX_DROP,
    TORCH_THREADS,
    Body,
    CpuMeter,
    drop_tier,
    fashion_mnist_pngs,
    hey,
    host_and_load,
    load_bank,
    measured_server,
    multipart,
    percentile_ms,
)

from dyce.bank import Bank
from dyce.pipeline import EarlyExitPipeline
from service.edge.decode import ImageDecoder
from service.engine.batcher import DynamicBatcher
from service.engine.model import ModelRuntime
from service.engine.tiers import Tier
from service.settings import Settings

console = Console(stderr=True)
OUT = Path(__file__).parent / "out"
IDLE_PAUSE_S = 0.002  # about a served batch-1 round trip, the time each process sleeps between requests
CPU_PARTS = ("server_main_thread", "server_other_threads", "server_children", "rest_of_machine")


@functools.cache
def decoder(runtime: ModelRuntime) -> ImageDecoder:
    """The server's own decoder, as its HTTP edge builds it."""
    return ImageDecoder.from_settings(runtime.preprocess, runtime.settings)


def bare_batch1(runtime: ModelRuntime, pngs: list[bytes], config, pause_s: float = 0.0) -> list[float]:
    """Decode + executor for one image at a time; ``pause_s`` asleep before each, as every process
    on a served request's path is between requests (a sleeping vCPU loses its caches' warmth:
    0.2 ms back to back, 0.5-0.7 ms after 2 ms asleep on a 2-core VM)."""
    times = []
    for png in pngs:
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        runtime.run(decoder(runtime)(png).unsqueeze(0), config)
        times.append(time.perf_counter() - start)
    return times


def bare_throughput(runtime: ModelRuntime, pngs: list[bytes], config, batch: int, seconds: float) -> float:
    """``EarlyExitExecutor.run`` on batches of decoded images, back to back (decoding not timed)."""
    images = torch.stack([decoder(runtime)(png) for png in pngs[:batch]])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runtime.run(images, config)
        done += batch
    return done / (time.perf_counter() - start)


def pipeline_throughput(
    runtime: ModelRuntime, pngs: list[bytes], config, batch: int, seconds: float, flush_each: bool = False
) -> float:
    """The core's continuous-batching pipeline (what the server runs), fed batch after batch.
    ``flush_each``: drain it after every batch, as the server does whenever its queue runs dry
    (a closed loop of a few clients: every partial batch at every deep position runs)."""
    images = torch.stack([decoder(runtime)(png) for png in pngs[: 8 * batch]])
    pipeline = EarlyExitPipeline(runtime.executor, batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for chunk in images.split(batch):
            pipeline.push(chunk, list(range(chunk.shape[0])), config)
            while pipeline.has_full_batch() or (flush_each and pipeline.waiting()):
                done += sum(len(out.tags) for out in pipeline.step(flush=flush_each))
    while pipeline.waiting():
        done += sum(len(out.tags) for out in pipeline.step(flush=True))
    return done / (time.perf_counter() - start)


def engine_closed_loop(
    runtime: ModelRuntime,
    bank: Bank,
    index: int,
    bodies: list[torch.Tensor],
    concurrency: int,
    clients_per_hey: int,
    seconds: float,
) -> float:
    """Images/s of the server's own batcher and pipeline, in this process, under a closed loop
    of ``concurrency`` clients that each send their next request the moment the last is
    answered: the engine's share of the served figure, with no HTTP, no channel between
    processes and no load generator to share the CPU with. ``bodies``: the decoded images of
    the requests ``served_load`` sends, one per ``clients_per_hey`` clients (the realised MAC
    saving of a few bodies differs from the bank's). Settings as the server's."""
    settings = runtime.settings
    tier = Tier(bank, index)

    async def drive() -> float:
        batcher = DynamicBatcher(
            EarlyExitPipeline(runtime.executor, settings.max_batch_size),
            max_delay_s=settings.max_queue_delay_ms / 1e3,
            max_wait_s=settings.max_pipeline_wait_ms / 1e3,
            capacity=4 * concurrency,
            position_offset=runtime.position_offset,
        )
        batcher.start()
        warm_until = time.perf_counter() + min(1.0, seconds / 4)
        end = warm_until + seconds
        answered = 0

        async def client(number: int) -> None:
            nonlocal answered
            images = bodies[number // clients_per_hey]
            while time.perf_counter() < end:
                job = batcher.submit(images, tier, False, False, batcher.reserve(len(images), 0))
                await job.future
                if warm_until <= time.perf_counter() <= end:  # answers inside the timed window
                    answered += len(images)

        try:
            await asyncio.gather(*(client(number) for number in range(concurrency)))
        finally:
            await batcher.stop()
        return answered / seconds

    return asyncio.run(drive())


def http_floor(url: str, count: int) -> list[float]:
    """Round trips of ``GET /v2/health/live``: what any request costs this client and server."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            start = time.perf_counter()
            client.get("/v2/health/live").raise_for_status()
            times.append(time.perf_counter() - start)
    return times


def served_batch1(url: str, pngs: list[bytes]) -> list[float]:
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for png in pngs:
            start = time.perf_counter()
            response = client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
            times.append(time.perf_counter() - start)
            response.raise_for_status()
    return times


Request = tuple[str, Body]  # path, body


def v1_bodies(pngs: list[bytes], per_request: int) -> list[Request]:
    """Multipart ``/v1/classify/batch`` requests, encoded once so the client only sends bytes."""
    starts = range(0, len(pngs) - per_request + 1, per_request)
    return [("/v1/classify/batch", multipart(pngs[start : start + per_request], "files")) for start in starts]


def v2_bodies(runtime: ModelRuntime, pngs: list[bytes], per_request: int, model: str) -> list[Request]:
    """Open Inference Protocol requests with preprocessed FP32 tensors in the binary extension."""
    bodies = []
    for start in range(0, len(pngs) - per_request + 1, per_request):
        tensor = torch.stack([decoder(runtime)(png) for png in pngs[start : start + per_request]]).numpy()
        raw = tensor.astype("<f4").tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": list(tensor.shape), "datatype": "FP32",
                     "parameters": {"binary_data_size": len(raw)}}
                ],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
            }
        ).encode()  # fmt: skip
        headers = {"Inference-Header-Content-Length": str(len(header))}
        bodies.append((f"/v2/models/{model}/infer", (header + raw, "application/octet-stream", headers)))
    return bodies


def concurrency_bodies(concurrency: int, clients_per_hey: int) -> int:
    """Distinct request bodies under load: one per hey process."""
    return -(-concurrency // clients_per_hey)


def served_load(
    url: str, requests: list[Request], per_request: int, concurrency: int, seconds: float, clients_per_hey: int
) -> dict:
    """Closed-loop ``hey`` clients, ``clients_per_hey`` to a process, each process its own body."""
    clients = [min(clients_per_hey, concurrency - start) for start in range(0, concurrency, clients_per_hey)]
    (path, _), bodies = requests[0], [body for _, body in requests[: concurrency_bodies(concurrency, clients_per_hey)]]
    with tempfile.TemporaryDirectory(prefix="dyce-serve-") as scratch:
        return hey(url + path, bodies, clients, seconds, Path(scratch), per_request)


def main(
    artifacts: Path = ARTIFACTS,
    max_drop: float = MAX_DROP,
    requests: int = typer.Option(300, help="sequential batch-1 requests per tier"),
    seconds: float = typer.Option(6.0, help="duration of each load phase"),
    concurrency: int = typer.Option(16, help="closed-loop clients under load"),
    clients_per_hey: int = typer.Option(4, help="clients per hey process, each process its own request body"),
    max_batch_size: int = typer.Option(32, help="the server's max batch, and the bare executor's batch"),
    images_per_request: int = typer.Option(8, help="images per request under load (/v1/classify/batch)"),
    torch_threads: int = TORCH_THREADS,
    http_workers: int = typer.Option(0, help="the server's HTTP worker processes; 0 = its choice from the cores"),
    rounds: int = typer.Option(3, min=1, help="rounds of top, drop; served figures are medians over them"),
) -> None:
    load_before = os.getloadavg()
    bank = load_bank(artifacts)
    top, drop = bank.most_accurate(), drop_tier(bank, max_drop)
    tiers = {"top": top, "drop": drop}
    # The images the load phases send: one body per hey process. Their realised MAC saving is
    # what the served gain can at best reach; the bank's figure is over the whole test split.
    served_images = concurrency_bodies(concurrency, clients_per_hey) * images_per_request
    pngs = fashion_mnist_pngs(max(requests, 256, served_images))
    torch.set_num_threads(torch_threads)
    settings = Settings(
        artifacts_dir=artifacts,
        admin_token="bench-" + "x" * 20,
        torch_threads=torch_threads,
        max_batch_size=max_batch_size,
    )
    runtime = ModelRuntime(settings)
    runtime.warm_up(bank)

    png_bodies = v1_bodies(pngs, images_per_request)
    tensor_bodies = v2_bodies(runtime, pngs, images_per_request, settings.model_name)
    figures: dict[str, dict[str, float]] = {name: {} for name in tiers}
    served_bodies = [
        decoder(runtime).batch([decoder(runtime).open(png) for png in pngs[start : start + images_per_request]])
        for start in range(0, served_images, images_per_request)
    ]
    sample = torch.cat(served_bodies)
    for name, index in tiers.items():
        config = bank.entries[index].config
        figures[name]["sample_relative_macs"] = float(runtime.run(sample, config).relative_macs.mean())
        bare = bare_batch1(runtime, pngs[:requests], config)
        figures[name]["bare_p50_ms"] = percentile_ms(bare, 50)
        figures[name]["bare_after_idle_p50_ms"] = percentile_ms(
            bare_batch1(runtime, pngs[:requests], config, pause_s=IDLE_PAUSE_S), 50
        )
        figures[name]["bare_throughput"] = bare_throughput(runtime, pngs, config, max_batch_size, seconds / 2)
        figures[name]["pipeline_throughput"] = pipeline_throughput(runtime, pngs, config, max_batch_size, seconds / 2)
        figures[name]["pipeline_flushed_throughput"] = pipeline_throughput(
            runtime, pngs, config, max_batch_size, seconds / 2, flush_each=True
        )
        figures[name]["engine_closed_loop_throughput"] = engine_closed_loop(
            runtime, bank, index, served_bodies, concurrency, clients_per_hey, seconds / 2
        )

    # Rounds alternate the tiers, so a drift of this host's speed (a noisy VM) hits both alike;
    # every served figure is the median over rounds, gains the median of each round's own ratio.
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in tiers}
    with measured_server(artifacts, OUT / "serve-server.log", torch_threads, max_batch_size, http_workers) as server:
        meter = CpuMeter(server.process.pid)
        floor_p50_ms = percentile_ms(http_floor(server.url, requests), 50)
        phases = [(name, index) for _ in range(rounds) for name, index in tiers.items()]
        for name, index in track(phases, description="serving", console=console):
            server.pin(index)
            served_batch1(server.url, pngs[:20])  # warm the connection path
            served = served_batch1(server.url, pngs[:requests])
            measured = {"served_p50_ms": percentile_ms(served, 50), "served_p95_ms": percentile_ms(served, 95)}
            for api, bodies in (("v1", png_bodies), ("v2", tensor_bodies)):
                served_load(server.url, bodies, images_per_request, concurrency, 1.0, clients_per_hey)  # warm
                before = meter.snapshot()
                load = served_load(server.url, bodies, images_per_request, concurrency, seconds, clients_per_hey)
                cpu = CpuMeter.per_request_ms(before, meter.snapshot(), load["requests"])
                measured[f"{api}_cpu_busy_cores"] = cpu.pop("busy_cores")
                measured |= {f"{api}_cpu_ms_per_request_{part}": value for part, value in cpu.items()}
                measured[f"{api}_served_throughput"] = load["images_per_s"]
                measured[f"{api}_load_p50_ms"] = load["p50_ms"]
                measured[f"{api}_load_p95_ms"] = load["p95_ms"]
                measured[f"{api}_load_errors"] = load["non_200"]
            for key, value in measured.items():
                runs[name].setdefault(key, []).append(value)
    for name in tiers:
        for key, values in runs[name].items():
            figures[name][key] = sum(values) if key.endswith("_errors") else statistics.median(values)
        figures[name]["v2_served_throughput_runs"] = runs[name]["v2_served_throughput"]

    table = Table("tier", "bank index", "rel. MACs", "accuracy", "bare p50 ms", "served p50 ms", "bare img/s",
                  "pipeline img/s (flushed)", "engine loop img/s", "v1 img/s", "v2 img/s", "v2 load p95 ms",
                  "v2 CPU ms/req: main / other threads / workers / rest", "busy cores")  # fmt: skip
    for name, index in tiers.items():
        entry, f = bank.entries[index], figures[name]
        cpu = " / ".join(f"{f[f'v2_cpu_ms_per_request_{part}']:.2f}" for part in CPU_PARTS)
        table.add_row(
            name, str(index), f"{entry.search.relative_macs:.3f}", f"{entry.search.accuracy:.4f}",
            f"{f['bare_p50_ms']:.2f}", f"{f['served_p50_ms']:.2f}", f"{f['bare_throughput']:.0f}",
            f"{f['pipeline_throughput']:.0f} ({f['pipeline_flushed_throughput']:.0f})",
            f"{f['engine_closed_loop_throughput']:.0f}",
            f"{f['v1_served_throughput']:.0f}", f"{f['v2_served_throughput']:.0f}", f"{f['v2_load_p95_ms']:.1f}",
            cpu, f"{f['v2_cpu_busy_cores']:.2f}",
        )  # fmt: skip
    console.print(table)

    def gain(key: str) -> float:
        return figures["drop"][key] / figures["top"][key]

    def round_gains(key: str) -> list[float]:
        return [d / t for d, t in zip(runs["drop"][key], runs["top"][key], strict=True)]

    overheads = [s - figures["top"]["bare_p50_ms"] for s in runs["top"]["served_p50_ms"]]

    predicted_gain = bank.entries[top].search.relative_macs / bank.entries[drop].search.relative_macs
    result = {
        "overhead_p50_ms": statistics.median(overheads),
        "overhead_p50_ms_runs": overheads,
        "http_floor_p50_ms": floor_p50_ms,
        # The same overhead against the bare path timed after a pause, as the server's processes
        # run it: what is left is the edge's own work and the hops, not this host's wake-up cost.
        "overhead_p50_ms_over_idle_bare": statistics.median(runs["top"]["served_p50_ms"])
        - figures["top"]["bare_after_idle_p50_ms"],
        "overhead_p50_ms_drop_tier": figures["drop"]["served_p50_ms"] - figures["drop"]["bare_p50_ms"],
        # v2 binary tensors: the client sends prepared bytes, so the server is what is measured.
        "served_over_predicted_gain": statistics.median(round_gains("v2_served_throughput")) / predicted_gain,
        "served_over_predicted_gain_runs": [g / predicted_gain for g in round_gains("v2_served_throughput")],
        "served_over_predicted_gain_v1_png": statistics.median(round_gains("v1_served_throughput")) / predicted_gain,
        "served_gain": statistics.median(round_gains("v2_served_throughput")),
        "bare_gain": gain("bare_throughput"),
        "pipeline_gain": gain("pipeline_throughput"),
        "pipeline_flushed_gain": gain("pipeline_flushed_throughput"),
        # The same batcher and clients in this process: what the engine alone keeps of the predicted
        # gain; served / this is what the HTTP edge, the channel and the shared CPU keep of it.
        "engine_closed_loop_over_predicted_gain": gain("engine_closed_loop_throughput") / predicted_gain,
        "served_over_engine_closed_loop_gain": statistics.median(round_gains("v2_served_throughput"))
        / gain("engine_closed_loop_throughput"),
        "rounds": rounds,
        "images_per_request": images_per_request,
        "concurrency": concurrency,
        "http_workers": http_workers,
        "predicted_gain": predicted_gain,
        "served_images": served_images,
        "sample_realised_gain": gain("sample_relative_macs") ** -1,
        "served_over_sample_realised_gain": statistics.median(round_gains("v2_served_throughput"))
        * gain("sample_relative_macs"),
        "top_index": top,
        "drop_index": drop,
        "drop_relative_accuracy": bank.entries[drop].search.accuracy / bank.entries[top].search.accuracy,
        "max_drop": max_drop,
        "tiers": figures,
        "artifacts": str(artifacts),
        "torch_threads": torch_threads,
        **host_and_load(load_before),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
