"""Engine settings side by side, served: one ``dyce-serve`` per variant, all running at once,
load alternated between them round by round, so a noisy host's drift hits every variant alike.

Each ``--variant`` is a list of ``DYCE_*`` settings (``rewrite_segments=false``; empty: the
defaults). Per round, tier (top, and the <= 0.5%-drop tier) and variant, in an order that
alternates: ``hey`` closed-loop clients posting ``--images-per-request`` preprocessed images as
Open Inference Protocol binary tensors for ``--seconds`` (images/s), then sequential batch-1 PNG
requests on one connection (p50 ms). Figures are medians over rounds; ratios to the first
variant are medians of each round's own ratio. Memory: one loaded model per variant.

Run: python bench/serve_variants.py --artifacts DIR --variant rewrite_segments=false --variant ""
Last line: JSON with ``variants`` (figures), ``ratios`` (to the first) and ``rounds_detail``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import httpx
import typer
from pipeline_variants import inherited_settings, medians_and_ratios, parse_variant
from rich.console import Console
from serve import served_load, v2_bodies
from serving_harness import (
    ARTIFACTS,
    MAX_DROP,
    TORCH_THREADS,
    drop_tier,
    fashion_mnist_pngs,
    host_and_load,
    load_bank,
    measured_server,
    percentile_ms,
)

from service.engine.model import ModelRuntime
from service.settings import Settings

console = Console(stderr=True)
OUT = Path(__file__).parent / "out"
# What measured_server sets for every server (a variant's value would be overridden) and what
# ServerProcess sets itself: options of this bench, not variants.
SET_BY_BENCH = {
    "artifacts_dir", "admin_token", "port", "torch_threads", "max_batch_size", "http_workers",
    "autoswitch", "queue_capacity", "slo_p95_ms",
}  # fmt: skip


def batch1_p50_ms(url: str, pngs: list[bytes]) -> float:
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for png in pngs:
            started = time.perf_counter()
            client.post("/v1/classify", content=png, headers={"content-type": "image/png"}).raise_for_status()
            times.append(time.perf_counter() - started)
    return percentile_ms(times, 50)


def main(
    artifacts: Path = ARTIFACTS,
    variant: list[str] = typer.Option(..., help="DYCE_* settings of one variant, key=value[,key=value]; repeat"),
    max_drop: float = MAX_DROP,
    rounds: int = typer.Option(4, min=1, help="rounds; each runs every tier on every variant"),
    seconds: float = typer.Option(5.0, help="duration of each load phase"),
    concurrency: int = typer.Option(16, help="closed-loop clients"),
    clients_per_hey: int = typer.Option(4, help="clients per hey process"),
    images_per_request: int = typer.Option(8, help="images per request under load"),
    requests: int = typer.Option(200, help="sequential batch-1 requests per phase"),
    max_batch_size: int = typer.Option(32, help="the servers' max batch"),
    http_workers: int = typer.Option(1, help="each server's HTTP worker processes (1: one process)"),
    torch_threads: int = TORCH_THREADS,
) -> None:
    load_before = os.getloadavg()
    bank = load_bank(artifacts)
    tiers = {"top": bank.most_accurate(), "drop": drop_tier(bank, max_drop)}
    predicted_gain = bank.entries[tiers["top"]].search.relative_macs / bank.entries[tiers["drop"]].search.relative_macs
    pngs = fashion_mnist_pngs(max(requests, 256))
    runtime = ModelRuntime(Settings(artifacts_dir=artifacts, admin_token="bench-" + "x" * 20))
    bodies = v2_bodies(runtime, pngs, images_per_request, runtime.settings.model_name)
    del runtime
    names = [text or "defaults" for text in variant]
    measured: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    detail = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, text in zip(names, variant, strict=True):
            overrides = {f"DYCE_{key.upper()}": value for key, value in parse_variant(text, SET_BY_BENCH).items()}
            saved = {key: os.environ.get(key) for key in overrides}
            os.environ.update(overrides)  # the server process inherits them
            try:
                log = OUT / f"serve_variants-{len(servers)}.log"
                servers[name] = stack.enter_context(
                    measured_server(artifacts, log, torch_threads, max_batch_size, http_workers)
                )
            finally:
                for key, value in saved.items():
                    if value is None:
                        del os.environ[key]
                    else:
                        os.environ[key] = value
        for round_index in range(rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for tier, index in tiers.items():
                for name in order:
                    server = servers[name]
                    server.pin(index)
                    served_load(server.url, bodies, images_per_request, concurrency, 1.0, clients_per_hey)  # warm
                    load = served_load(server.url, bodies, images_per_request, concurrency, seconds, clients_per_hey)
                    p50 = batch1_p50_ms(server.url, pngs[:requests])
                    measured[name].setdefault(f"{tier}_images_per_s", []).append(load["images_per_s"])
                    measured[name].setdefault(f"{tier}_batch1_p50_ms", []).append(p50)
                    row = {"round": round_index, "tier": tier, "variant": name, "images_per_s": load["images_per_s"]}
                    detail.append(row | {"batch1_p50_ms": p50, "errors": load["non_200"]})
                    console.print(f"round {round_index} {tier:4s} {name}: {load['images_per_s']:.0f} images/s, "
                                  f"batch 1 p50 {p50:.2f} ms")  # fmt: skip
    for name in names:
        tops, drops = measured[name]["top_images_per_s"], measured[name]["drop_images_per_s"]
        measured[name]["served_over_predicted_gain"] = [
            d / t / predicted_gain for t, d in zip(tops, drops, strict=True)
        ]
    first = names[0]
    figures, ratios = medians_and_ratios(measured)
    result = {
        "variants": figures,
        "ratios": ratios,
        "first": first,
        "predicted_gain": predicted_gain,
        "tiers": tiers,
        "rounds": rounds,
        "rounds_detail": detail,
        "concurrency": concurrency,
        "images_per_request": images_per_request,
        "http_workers": http_workers,
        "torch_threads": torch_threads,
        "artifacts": str(artifacts),
        "inherited_settings": inherited_settings(),
        **host_and_load(load_before),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
