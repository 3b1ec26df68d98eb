"""HTTP serving vs the bare executor, for the top tier and a <= 0.5%-drop tier of a bank.

In-process baseline: the service's own decoder and ``EarlyExitExecutor.run`` (same artefacts,
same torch threads). Served: ``dyce-serve`` in its own process, pinned to each tier through the
admin API, driven by httpx with real Fashion-MNIST PNGs:

* batch 1: sequential requests on one keep-alive connection; overhead = served p50 - bare p50
  (bare = decode + executor for one image);
* under load: ``--concurrency`` closed-loop clients for ``--seconds``; throughput in images/s,
  against the bare executor's throughput at the server's max batch size.

served gain = throughput(drop tier) / throughput(top tier) under load; predicted gain = the
bank's expected relative MACs, top / drop. Last line: JSON with ``overhead_p50_ms`` and
``served_over_predicted_gain`` (and the rest of the figures).

Run: python bench/serve.py [--artifacts artifacts] [--max-drop 0.005] [--seconds 6]
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table
from serving_harness import ServerProcess, drop_tier, fashion_mnist_pngs, load_bank, percentile_ms

from service.runtime import ModelRuntime
from service.settings import Settings

console = Console(stderr=True)
OUT = Path(__file__).parent / "out"


def bare_batch1(runtime: ModelRuntime, pngs: list[bytes], config) -> list[float]:
    times = []
    for png in pngs:
        start = time.perf_counter()
        runtime.run(runtime.decoder(png).unsqueeze(0), config)
        times.append(time.perf_counter() - start)
    return times


def bare_throughput(runtime: ModelRuntime, pngs: list[bytes], config, batch: int, seconds: float) -> float:
    images = torch.stack([runtime.decoder(png) for png in pngs[:batch]])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runtime.run(images, config)
        done += batch
    return done / (time.perf_counter() - start)


def served_batch1(url: str, pngs: list[bytes]) -> list[float]:
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for png in pngs:
            start = time.perf_counter()
            response = client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
            times.append(time.perf_counter() - start)
            response.raise_for_status()
    return times


async def served_load(url: str, pngs: list[bytes], concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < stop:
                png = pngs[i % len(pngs)]
                i += concurrency
                start = time.perf_counter()
                response = await client.post("/v1/classify", content=png, headers={"content-type": "image/png"})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, errors


def main(
    artifacts: Path = typer.Option(Path("artifacts"), help="artefacts built by `dyce-offline build`"),
    max_drop: float = typer.Option(0.005, help="accuracy drop (relative to the best entry) of the cheaper tier"),
    requests: int = typer.Option(300, help="sequential batch-1 requests per tier"),
    seconds: float = typer.Option(6.0, help="duration of each load phase"),
    concurrency: int = typer.Option(16, help="closed-loop clients under load"),
    max_batch_size: int = typer.Option(32, help="the server's max batch, and the bare executor's batch"),
    torch_threads: int = typer.Option(1, help="intra-op threads, in-process and in the server alike"),
) -> None:
    bank = load_bank(artifacts)
    top, drop = bank.most_accurate(), drop_tier(bank, max_drop)
    tiers = {"top": top, "drop": drop}
    pngs = fashion_mnist_pngs(max(requests, 256))
    torch.set_num_threads(torch_threads)
    settings = Settings(artifacts_dir=artifacts, admin_token="bench-" + "x" * 20, torch_threads=torch_threads)
    runtime = ModelRuntime(settings)
    runtime.warm_up(bank)

    figures: dict[str, dict[str, float]] = {name: {} for name in tiers}
    for name, index in tiers.items():
        config = bank.entries[index].config
        bare = bare_batch1(runtime, pngs[:requests], config)
        figures[name]["bare_p50_ms"] = percentile_ms(bare, 50)
        figures[name]["bare_throughput"] = bare_throughput(runtime, pngs, config, max_batch_size, seconds / 2)

    server = ServerProcess(
        artifacts,
        OUT / "serve-server.log",
        autoswitch="manual",
        torch_threads=torch_threads,
        max_batch_size=max_batch_size,
        queue_capacity=4096,
    )
    with server:
        for name, index in track(list(tiers.items()), description="serving", console=console):
            server.pin(index)
            served_batch1(server.url, pngs[:20])  # warm the connection path
            served = served_batch1(server.url, pngs[:requests])
            figures[name]["served_p50_ms"] = percentile_ms(served, 50)
            figures[name]["served_p95_ms"] = percentile_ms(served, 95)
            throughput, latencies, errors = asyncio.run(served_load(server.url, pngs, concurrency, seconds))
            figures[name]["served_throughput"] = throughput
            figures[name]["load_p50_ms"] = percentile_ms(latencies, 50)
            figures[name]["load_p95_ms"] = percentile_ms(latencies, 95)
            figures[name]["load_errors"] = errors

    table = Table("tier", "bank index", "rel. MACs", "accuracy", "bare p50 ms", "served p50 ms", "bare img/s",
                  "served img/s", "load p95 ms")  # fmt: skip
    for name, index in tiers.items():
        entry, f = bank.entries[index], figures[name]
        table.add_row(
            name, str(index), f"{entry.search.relative_macs:.3f}", f"{entry.search.accuracy:.4f}",
            f"{f['bare_p50_ms']:.2f}", f"{f['served_p50_ms']:.2f}", f"{f['bare_throughput']:.0f}",
            f"{f['served_throughput']:.0f}", f"{f['load_p95_ms']:.1f}",
        )  # fmt: skip
    console.print(table)

    predicted_gain = bank.entries[top].search.relative_macs / bank.entries[drop].search.relative_macs
    served_gain = figures["drop"]["served_throughput"] / figures["top"]["served_throughput"]
    bare_gain = figures["drop"]["bare_throughput"] / figures["top"]["bare_throughput"]
    result = {
        "overhead_p50_ms": figures["top"]["served_p50_ms"] - figures["top"]["bare_p50_ms"],
        "overhead_p50_ms_drop_tier": figures["drop"]["served_p50_ms"] - figures["drop"]["bare_p50_ms"],
        "served_over_predicted_gain": served_gain / predicted_gain,
        "served_gain": served_gain,
        "bare_gain": bare_gain,
        "predicted_gain": predicted_gain,
        "top_index": top,
        "drop_index": drop,
        "drop_relative_accuracy": bank.entries[drop].search.accuracy / bank.entries[top].search.accuracy,
        "max_drop": max_drop,
        "tiers": figures,
        "artifacts": str(artifacts),
        "torch_threads": torch_threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
