"""Engine settings side by side, in one process: the continuous-batching pipeline the server
drives, for the top tier and a <= 0.5%-drop tier of a bank, under each variant of the settings.

Each ``--variant`` is a list of ``DYCE_*`` settings (``rewrite_segments=false``,
``memory_format=channels_last,rewrite_segments=false``; empty: the defaults) and gets its own
``ModelRuntime``, warmed up as the server warms up. Rounds interleave the variants, so a drift
of a noisy host's speed hits them alike; figures are medians over rounds, and each variant's
ratio to the first is the median of each round's own ratio.

Per tier and variant: images/s of the pipeline fed batch after batch (``undrained``) and drained
after every batch (``drained``: what a closed loop of a few clients makes the server do, every
partial batch at every deep position runs), and each segment's time at batch 1.

Run: python bench/pipeline_variants.py --artifacts DIR --variant rewrite_segments=false --variant ""
Last line: JSON with ``variants`` (figures per variant) and ``ratios`` (each to the first).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table
from serve import decoder, pipeline_throughput
from serving_harness import (
    ARTIFACTS,
    MAX_DROP,
    TORCH_THREADS,
    drop_tier,
    fashion_mnist_pngs,
    host_and_load,
    load_bank,
)

from dyce.timing import median_time
from service.engine.model import ModelRuntime
from service.settings import Settings

console = Console(stderr=True)


def parse_variant(text: str, fixed: set[str]) -> dict[str, str]:
    """``key=value[,key=value]`` as settings; ``fixed``: settings the bench sets itself (its options)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise typer.BadParameter(f"variant {text!r}: expected key=value[,key=value]")
    variant = {key.strip().lower(): value.strip() for key, value in pairs}
    if clash := sorted(set(variant) & fixed):
        raise typer.BadParameter(
            f"variant {text!r} sets {clash}, which this bench sets for every variant: use its options"
        )
    return variant


def inherited_settings() -> dict[str, str]:
    """``DYCE_*`` variables of this shell: every variant inherits them, so the JSON line says which."""
    return {key: value for key, value in os.environ.items() if key.startswith("DYCE_")}


def medians_and_ratios(
    measured: dict[str, dict[str, list[float]]],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per variant (in order, the first the reference) and figure: the median over rounds, and
    the median of each round's own ratio to the first variant's, so a host's drift cancels."""
    first, *others = measured
    medians = {
        name: {key: statistics.median(values) for key, values in figures.items()} for name, figures in measured.items()
    }
    ratios = {
        name: {
            key: statistics.median(v / f for v, f in zip(values, measured[first][key], strict=True))
            for key, values in measured[name].items()
        }
        for name in others
    }
    return medians, ratios


def segment_batch1_ms(runtime: ModelRuntime, image: torch.Tensor) -> list[float]:
    """Each backbone segment's median time on one image, as the engine runs it."""
    backend = runtime.executor.backend
    times = []
    with torch.inference_mode():
        x = backend.prepare(image)
        for position in range(runtime.num_positions):
            seconds, x = median_time(lambda p=position, v=x: backend.segment(p, v), 20, backend.device)
            times.append(seconds * 1e3)
    return times


def main(
    artifacts: Path = ARTIFACTS,
    variant: list[str] = typer.Option(..., help="DYCE_* settings of one variant, key=value[,key=value]; repeat"),
    max_drop: float = MAX_DROP,
    rounds: int = typer.Option(3, min=1, help="rounds; each runs every variant once, in turn"),
    seconds: float = typer.Option(2.0, help="duration of each throughput measurement"),
    max_batch_size: int = typer.Option(32, help="the pipeline's batch"),
    torch_threads: int = TORCH_THREADS,
) -> None:
    load_before = os.getloadavg()
    torch.set_num_threads(torch_threads)
    bank = load_bank(artifacts)
    tiers = {"top": bank.most_accurate(), "drop": drop_tier(bank, max_drop)}
    pngs = fashion_mnist_pngs(8 * max_batch_size)
    names = [text or "defaults" for text in variant]
    runtimes = {}
    fixed = {"artifacts_dir": artifacts, "admin_token": "bench-" + "x" * 20, "torch_threads": torch_threads,
             "max_batch_size": max_batch_size}  # fmt: skip
    for name, text in zip(names, variant, strict=True):
        settings = Settings(**fixed, **parse_variant(text, set(fixed)))
        runtimes[name] = ModelRuntime(settings)
        runtimes[name].warm_up(bank)

    measured: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for round_index in track(range(rounds), description="rounds", console=console):
        # Alternate the order, so no variant always runs right after another's allocations.
        for name in names if round_index % 2 == 0 else names[::-1]:
            runtime = runtimes[name]
            for tier, index in tiers.items():
                config = bank.entries[index].config
                for mode, drained in (("undrained", False), ("drained", True)):
                    value = pipeline_throughput(runtime, pngs, config, max_batch_size, seconds, flush_each=drained)
                    measured[name].setdefault(f"{tier}_{mode}", []).append(value)

    first = names[0]
    figures, ratios = medians_and_ratios(measured)
    image = decoder(runtimes[first])(pngs[0]).unsqueeze(0)
    for name in names:
        figures[name]["segment_batch1_ms"] = segment_batch1_ms(runtimes[name], image)

    table = Table("variant", *measured[first], "ratio to first (median of rounds)")
    for name in names:
        ratio = ", ".join(f"{value:.2f}" for value in ratios.get(name, {}).values()) or "-"
        table.add_row(name, *(f"{figures[name][key]:.0f}" for key in measured[first]), ratio)
    console.print(table)
    console.print("images/s of the in-process pipeline; drained: after every batch")
    result = {
        "variants": figures,
        "ratios": ratios,
        "first": first,
        "tiers": tiers,
        "rounds": rounds,
        "max_batch_size": max_batch_size,
        "torch_threads": torch_threads,
        "artifacts": str(artifacts),
        "inherited_settings": inherited_settings(),
        **host_and_load(load_before),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
