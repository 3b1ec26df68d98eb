"""Open-loop step load against the autoswitcher.

1. Capacity: the top tier pinned, closed-loop clients saturate the server; images/s served is
   the full model's measured capacity C.
2. Full model alone: still pinned, open-loop Poisson arrivals at the overload rate; its p95.
3. Autoswitch: the same server in auto mode, Poisson arrivals stepping through ``--schedule``
   (multiples of C; default 0.5x -> 4x -> 0.5x). Arrivals are open-loop: the generator never
   waits for answers, so a slow server meets the same offered load as a fast one. Arrivals come
   from ``--generators`` processes, each an independent Poisson stream at its share of the rate
   (the sum is Poisson at the full rate): one Python process cannot keep to the schedule at the
   request rates of a GPU host.

Requests carry ``--images-per-request`` preprocessed images as Open Inference Protocol binary
tensors (what tritonclient sends): on this tiny model one image per request would make the
HTTP layer (and a Python load generator sharing the CPU), not the model, the bottleneck, and
no tier could help. Latency counts from when a request was due, so a generator that falls
behind shows up in the figures instead of hiding; the server's own x-total-time is reported
beside it.

Prints p50/p95/p99, throughput, rejections and tiers per step, draws bench/out/load_step.png,
and ends with one JSON line: switch_latency_s (overload step -> first switch), admitted_p95_ms
(admitted requests during the overload step), full_model_p95_ms, recover_s (load drop -> back
on the top tier), max_switches_per_5s_steady (any 5 s window, leaving out 4 s after each step).

Run: python bench/load_step.py [--artifacts artifacts] [--schedule 0.5:10,4:15,0.5:15]
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from serve import Request, served_load, v2_bodies
from serving_harness import ServerProcess, fashion_mnist_pngs, host_and_load, load_bank, percentile_ms

from service.engine.model import ModelRuntime
from service.settings import Settings, available_cores

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

console = Console(stderr=True)
OUT = Path(__file__).parent / "out"
SETTLE_S = 4.0  # after a step, the switcher may legitimately move; steady state starts here
GENERATOR_START_S = 120.0  # a spawned generator imports torch before it is ready


@dataclass
class Outcome:
    sent: float  # when the request was due, seconds since the run started
    status: int
    latency: float  # from when it was due (open loop: the generator's own delays count)
    server_latency: float | None  # the server's x-total-time, arrival to answer
    bank_index: int | None
    generator: int = 0  # which load-generator process sent it


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    tiers: list[tuple[float, int]] = field(default_factory=list)  # (t, active bank index), polled
    lag: list[float] = field(default_factory=list)  # how late each request left the generator


async def _send(
    client: httpx.AsyncClient, request: Request, outcomes: list[Outcome], due: float, origin: float, generator: int
) -> None:
    path, (content, content_type, headers) = request
    headers = {"content-type": content_type, **headers}
    index, server_latency = None, None
    try:
        response = await client.post(path, content=content, headers=headers)
        status = response.status_code
        if status == 200:
            header = json.loads(response.content[: int(response.headers["inference-header-content-length"])])
            index = header["parameters"]["bank_index"]
            server_latency = float(response.headers["x-total-time"]) / 1e3
    except httpx.HTTPError:
        status = 599  # transport failure: counted, never silently dropped
    outcomes.append(Outcome(due - origin, status, time.monotonic() - due, server_latency, index, generator))


async def _share(
    url: str, bodies: list[Request], schedule: list[tuple[float, float]], per_request: int, seed: int,
    generator: int, generators: int, origin: float,
) -> tuple[list[Outcome], list[float]]:  # fmt: skip
    """One generator's Poisson arrivals, at 1/``generators`` of each step's rate, from ``origin``
    (``time.monotonic``, one clock for every process on the host)."""
    rng = random.Random(seed * 1_000_003 + generator)
    outcomes: list[Outcome] = []
    lag: list[float] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks: set[asyncio.Task[None]] = set()
        due, end, i = origin, origin, generator
        for rate, seconds in schedule:
            end += seconds
            while True:
                due += rng.expovariate(rate / per_request / generators)
                if due >= end:
                    due = end
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag.append(time.monotonic() - due)
                task = asyncio.create_task(_send(client, bodies[i % len(bodies)], outcomes, due, origin, generator))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += generators  # generators take turns through the bodies
        await asyncio.gather(*tasks)
    return outcomes, lag


def _generator_process(generator: int, generators: int, args: tuple, ready, go, origin, results) -> None:
    """Child process: import, say ready, wait for the common origin, generate, send back."""
    ready.put(generator)
    go.wait()
    try:
        outcomes, lag = asyncio.run(_share(*args, generator=generator, generators=generators, origin=origin.value))
        results.put((generator, outcomes, lag, None))
    except BaseException as err:  # the parent must hear of it, not wait forever
        results.put((generator, [], [], repr(err)))


async def _poll_tier(url: str, admin_headers: dict[str, str], run: Run, origin: float, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, headers=admin_headers, timeout=10) as client:
        while not stop.is_set():
            active = (await client.get("/admin/active")).json()
            run.tiers.append((time.monotonic() - origin, active["tier"]["bank_index"]))
            await asyncio.sleep(0.1)


def open_loop(
    url: str, admin_headers: dict[str, str], bodies: list[Request], schedule: list[tuple[float, float]],
    per_request: int, seed: int, generators: int = 1,
) -> Run:  # fmt: skip
    """Poisson arrivals at ``rate`` images/s for ``seconds``, step after step, from ``generators``
    processes at once, each an independent Poisson stream at 1/``generators`` of the rate (their
    sum is a Poisson stream at the full rate). One Python process lags behind the schedule at a
    few hundred requests/s (up to 3 s at p99 was seen on a 16-core GPU host), and its lag would
    count as the server's latency. The active tier is polled from this process meanwhile."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    ready, results, go, origin = context.Queue(), context.Queue(), context.Event(), context.Value("d", 0.0)
    args = (url, bodies, schedule, per_request, seed)
    processes = [
        context.Process(target=_generator_process, args=(k, generators, args, ready, go, origin, results), daemon=True)
        for k in range(generators)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=GENERATOR_START_S)
        origin.value = time.monotonic() + 0.2  # every generator is waiting on ``go`` by now
        go.set()
        run = asyncio.run(_collect(url, admin_headers, origin.value, results, len(processes), schedule))
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return run


async def _collect(
    url: str, admin_headers: dict[str, str], origin: float, results, generators: int,
    schedule: list[tuple[float, float]],
) -> Run:  # fmt: skip
    run, stop = Run(), asyncio.Event()
    poller = asyncio.create_task(_poll_tier(url, admin_headers, run, origin, stop))
    # Past the schedule, every request in flight still gets its 60 s client timeout.
    timeout = sum(seconds for _, seconds in schedule) + 60 + GENERATOR_START_S
    loop = asyncio.get_running_loop()
    failures = []
    try:
        for _ in range(generators):
            generator, outcomes, lag, error = await loop.run_in_executor(None, results.get, True, timeout)
            if error is not None:
                failures.append(f"generator {generator}: {error}")
            run.outcomes += outcomes
            run.lag += lag
    finally:
        stop.set()
        await poller
    if failures:
        raise RuntimeError("; ".join(failures))
    run.outcomes.sort(key=lambda outcome: outcome.sent)
    return run


def default_generators() -> int:
    """One load-generator process per 4 cores, at most 8: a 2-core host gets 1 and leaves the
    server its cores; a 16-core GPU host gets 4."""
    return max(1, min(8, available_cores() // 4))


def switch_times(run: Run) -> list[tuple[float, int, int]]:
    """(t, from, to) for every change of the polled active tier."""
    return [(t, a, b) for (_, a), (t, b) in zip(run.tiers, run.tiers[1:], strict=False) if a != b]


def analyse(run: Run, schedule: list[tuple[float, float]], top: int, slo_ms: float) -> dict:
    bounds = np.cumsum([0.0] + [s for _, s in schedule])
    switches = switch_times(run)
    rows = []
    for n, (rate, seconds) in enumerate(schedule):
        start, stop = bounds[n], bounds[n + 1]
        outcomes = [o for o in run.outcomes if start <= o.sent < stop]
        admitted = [o.latency for o in outcomes if o.status == 200]
        served = [o.server_latency for o in outcomes if o.server_latency is not None]
        rows.append(
            {
                "rate": rate,
                "seconds": seconds,
                "requests": len(outcomes),
                "admitted": len(admitted),
                "rejected_429": sum(o.status == 429 for o in outcomes),
                "timeouts_504": sum(o.status == 504 for o in outcomes),
                "other_errors": sum(o.status not in (200, 429, 504) for o in outcomes),
                "p50_ms": percentile_ms(admitted, 50),
                "p95_ms": percentile_ms(admitted, 95),
                "p99_ms": percentile_ms(admitted, 99),
                "server_p95_ms": percentile_ms(served, 95),
                "tiers": sorted({o.bank_index for o in outcomes if o.bank_index is not None}),
            }
        )
    overload = int(np.argmax([rate for rate, _ in schedule]))
    after = overload + 1 if overload + 1 < len(schedule) else None
    first_switch = next((t for t, _, _ in switches if t >= bounds[overload]), None)
    recover = None
    if after is not None:
        drop = bounds[after]
        on_top_again = [t for t, _, b in switches if t >= drop and b == top]
        if on_top_again:
            recover = on_top_again[0] - drop
        elif not any(t >= drop for t, _, _ in switches) and run.tiers and run.tiers[-1][1] == top:
            recover = 0.0
    steady = [(bounds[n] + SETTLE_S, bounds[n + 1]) for n in range(len(schedule))]
    max_per_window = 0
    for start, stop in steady:
        times = [t for t, _, _ in switches if start <= t < stop]
        for t in times:
            max_per_window = max(max_per_window, sum(t <= u < t + 5 for u in times))
    return {
        "steps": rows,
        "switches": switches,
        "switch_latency_s": None if first_switch is None else first_switch - bounds[overload],
        "admitted_p95_ms": rows[overload]["p95_ms"],
        "admitted_server_p95_ms": rows[overload]["server_p95_ms"],
        "recover_s": recover,
        "max_switches_per_5s_steady": max_per_window,
        "slo_ms": slo_ms,
    }


def plot(run: Run, schedule: list[tuple[float, float]], capacity: float, per_request: int, slo_ms: float) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    horizon = sum(s for _, s in schedule)
    seconds = np.arange(int(np.ceil(horizon)) + 1)
    sent = np.array([o.sent for o in run.outcomes])
    ok = np.array([o.status == 200 for o in run.outcomes])
    latency = np.array([o.latency * 1e3 for o in run.outcomes])
    bins = np.clip(np.floor(sent).astype(int), 0, len(seconds) - 1)
    fig, (load_ax, lat_ax, tier_ax) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    offered = np.concatenate([[r * capacity, r * capacity] for r, _ in schedule])
    edges = np.concatenate([[a, b] for a, b in zip(np.cumsum([0] + [s for _, s in schedule])[:-1],
                                                    np.cumsum([s for _, s in schedule]), strict=True)])  # fmt: skip
    load_ax.plot(edges, offered, "k--", label="offered (images/s)")
    load_ax.plot(seconds, np.bincount(bins[ok], minlength=len(seconds)) * per_request, label="served (images/s)")
    load_ax.plot(seconds, np.bincount(bins[~ok], minlength=len(seconds)) * per_request, label="rejected (images/s)")
    load_ax.axhline(capacity, color="grey", lw=0.8, label="full-model capacity")
    load_ax.set_ylabel("images/s")
    load_ax.legend(loc="upper right", fontsize=8)
    for q, style in ((50, "-"), (95, "-"), (99, ":")):
        values = [np.percentile(latency[ok & (bins == s)], q) if np.any(ok & (bins == s)) else np.nan for s in seconds]
        lat_ax.plot(seconds, values, style, label=f"p{q}")
    lat_ax.axhline(slo_ms, color="red", lw=0.8, label=f"SLO {slo_ms:g} ms")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("admitted latency (ms)")
    lat_ax.legend(loc="upper right", fontsize=8)
    if run.tiers:
        times, indices = zip(*run.tiers, strict=True)
        tier_ax.step(times, indices, where="post")
        tier_ax.set_yticks(sorted(set(indices)))
    tier_ax.set_ylabel("active bank index")
    tier_ax.set_xlabel("seconds")
    fig.suptitle("DyCE autoswitcher under an open-loop step load")
    fig.tight_layout()
    path = OUT / "load_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    artifacts: Path = typer.Option(Path("artifacts"), help="artefacts built by `dyce-offline build`"),
    schedule: str = typer.Option("0.5:10,4:15,0.5:15", help="rate (x capacity):seconds, comma separated"),
    slo_ms: float = typer.Option(100.0, help="the server's p95 objective (DYCE_SLO_P95_MS)"),
    images_per_request: int = typer.Option(32, help="few, big requests keep the Python generator on schedule"),
    max_batch_size: int = typer.Option(32),
    capacity_seconds: float = typer.Option(6.0, help="closed-loop saturation used to measure capacity"),
    capacity: float = typer.Option(
        0.0, help="images/s the schedule multiplies, to offer two servers the same load; 0 = measure it"
    ),
    full_model_seconds: float = typer.Option(8.0, help="pinned top tier at the overload rate"),
    torch_threads: int = typer.Option(1, help="intra-op threads of the server (the load generator needs a core)"),
    seed: int = typer.Option(0),
    generators: int = typer.Option(
        0, help="load-generator processes, each a share of the Poisson arrivals; 0 = one per 4 cores, at most 8"
    ),
) -> None:
    load_before = os.getloadavg()
    generators = generators or default_generators()
    steps = [(float(r), float(s)) for r, s in (part.split(":") for part in schedule.split(","))]
    measure_capacity = not capacity
    bank = load_bank(artifacts)
    top = bank.most_accurate()
    runtime = ModelRuntime(Settings(artifacts_dir=artifacts, admin_token="bench-" + "x" * 20))
    torch.set_num_threads(torch_threads)
    bodies = v2_bodies(runtime, fashion_mnist_pngs(1024), images_per_request, "dyce")
    server = ServerProcess(
        artifacts,
        OUT / "load_step-server.log",
        autoswitch="manual",
        slo_p95_ms=slo_ms,
        torch_threads=torch_threads,
        max_batch_size=max_batch_size,
    )
    with server:
        server.pin(top)
        served_load(server.url, bodies, images_per_request, 16, 2.0, clients_per_hey=4)  # warm
        if measure_capacity:
            console.print(f"[bold]capacity[/]: top tier {top} pinned, closed loop for {capacity_seconds:g} s")
            capacity = served_load(server.url, bodies, images_per_request, 16, capacity_seconds, clients_per_hey=4)[
                "images_per_s"
            ]
        overload = max(rate for rate, _ in steps)
        console.print(f"capacity {capacity:.0f} images/s; [bold]full model alone[/] at {overload:g}x")
        alone = open_loop(
            server.url, server.admin_headers, bodies, [(overload * capacity, full_model_seconds)],
            images_per_request, seed, generators,
        )  # fmt: skip
        full_admitted = [o.latency for o in alone.outcomes if o.status == 200]
        full_model_p95 = percentile_ms(full_admitted, 95)
        full_model_server_p95 = percentile_ms([o.server_latency for o in alone.outcomes if o.server_latency], 95)
        server.admin("POST", "/admin/mode", json={"mode": "auto"})
        time.sleep(5.0)  # the backlog's latencies leave the switcher's windows
        deadline = time.monotonic() + 60  # then it settles on the top tier
        while server.admin("GET", "/admin/active")["tier"]["bank_index"] != top and time.monotonic() < deadline:
            time.sleep(0.5)
        console.print(f"[bold]autoswitch[/]: schedule {schedule} (x {capacity:.0f} images/s)")
        console.print(f"{generators} load-generator process(es)")
        run = open_loop(
            server.url, server.admin_headers, bodies, [(r * capacity, s) for r, s in steps],
            images_per_request, seed, generators,
        )  # fmt: skip
    figures = analyse(run, steps, top, slo_ms)
    path = plot(run, steps, capacity, images_per_request, slo_ms)

    table = Table(
        "step", "x cap.", "requests", "admitted", "429", "504", "p50 ms", "p95 ms", "p99 ms", "server p95", "tiers"
    )
    for n, row in enumerate(figures["steps"]):
        table.add_row(
            str(n), f"{row['rate']:g}", str(row["requests"]), str(row["admitted"]), str(row["rejected_429"]),
            str(row["timeouts_504"]), f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}", f"{row['p99_ms']:.1f}",
            f"{row['server_p95_ms']:.1f}",
            ",".join(map(str, row["tiers"])),
        )  # fmt: skip
    console.print(table)
    for t, before, after in figures["switches"]:
        console.print(f"  t={t:6.2f} s  tier {before} -> {after}")
    console.print(f"plot: {path}")
    lag = np.array(run.lag)
    result = {
        "switch_latency_s": figures["switch_latency_s"],
        "admitted_p95_ms": figures["admitted_p95_ms"],
        "admitted_server_p95_ms": figures["admitted_server_p95_ms"],
        "full_model_p95_ms": full_model_p95,
        "full_model_server_p95_ms": full_model_server_p95,
        "full_model_rejected": sum(o.status != 200 for o in alone.outcomes),
        "full_model_requests": len(alone.outcomes),
        "recover_s": figures["recover_s"],
        "max_switches_per_5s_steady": figures["max_switches_per_5s_steady"],
        "slo_ms": slo_ms,
        "capacity_images_per_s": capacity,
        "capacity_measured": measure_capacity,
        "images_per_request": images_per_request,
        "generator_lag_p99_ms": float(np.percentile(lag, 99) * 1e3) if lag.size else None,
        "generators": generators,
        "steps": figures["steps"],
        "switches": figures["switches"],
        "top_index": top,
        "plot": str(path),
        **host_and_load(load_before),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
