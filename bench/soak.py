"""Memory soak: does the server's resident memory stay flat over tens of thousands of requests?

``dyce-serve`` runs in its own process on a free port against ``--artifacts``; closed-loop httpx
clients post real Fashion-MNIST PNGs to ``/v1/classify``. After ``--warmup`` requests (allocator
pools, caches and metric children settle), the server's RSS (``/proc/<pid>/status``, summed over
the engine process and its HTTP worker processes) is the start; then ``--pinned`` requests with
the tier pinned through ``/admin/active`` (manual mode, the state in which issue 11 found the
load window growing without bound), then ``--auto`` requests
with the autoswitcher on. RSS is sampled along the way; the last line is JSON with
``rss_growth_pct`` (end vs start), the request and error counts (admission control's 429s are
counted apart: they are load, not faults), and the host: CPU flags, GPU, load average (a busy
host makes the figures slower, not the memory larger).

Run: python bench/soak.py [--artifacts artifacts] [--pinned 30000] [--auto 5000]
     python bench/soak.py --small   # builds the small test artefacts into a temporary directory
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

import httpx
import typer
from measure import print_rows
from rich.console import Console
from serving_harness import ServerProcess, cpu_summary, fashion_mnist_pngs, gpu_summary, load_bank

console = Console(stderr=True)
OUT = Path(__file__).parent / "out"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def rss_mb(pid: int) -> float:
    """The server's resident memory: its own and every process it started (the HTTP workers)."""
    total = _rss_mb(pid)
    for child in _descendants(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += _rss_mb(child)
    return total


class Load:
    """``total`` POSTs from ``concurrency`` closed-loop clients; counts answers by status."""

    def __init__(self, url: str, pngs: list[bytes], concurrency: int) -> None:
        self.url, self.pngs, self.concurrency = url, pngs, concurrency
        self.statuses: dict[str, int] = {}
        self.lock = threading.Lock()

    def run(self, total: int) -> float:
        tickets = count()
        started = time.perf_counter()

        def client() -> None:
            with httpx.Client(base_url=self.url, timeout=30) as http:
                while (ticket := next(tickets)) < total:
                    png = self.pngs[ticket % len(self.pngs)]
                    try:
                        response = http.post("/v1/classify", content=png, headers={"content-type": "image/png"})
                        outcome = str(response.status_code)
                    except httpx.HTTPError as err:
                        outcome = type(err).__name__
                    with self.lock:
                        self.statuses[outcome] = self.statuses.get(outcome, 0) + 1

        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in [pool.submit(client) for _ in range(self.concurrency)]:
                future.result()
        return total / (time.perf_counter() - started)

    @property
    def errors(self) -> int:
        """Answers that are neither a classification nor admission control's 429 (load, not a fault)."""
        return sum(n for outcome, n in self.statuses.items() if outcome not in ("200", "429"))


def soak(artifacts: Path, warmup: int, pinned: int, auto: int, concurrency: int, step: int) -> dict[str, object]:
    bank = load_bank(artifacts)
    top = bank.most_accurate()
    pngs = fashion_mnist_pngs(500)
    rows: list[dict[str, object]] = []
    with ServerProcess(artifacts, OUT / "soak-server.log", autoswitch="manual") as server:
        pid = server.process.pid
        load = Load(server.url, pngs, concurrency)
        server.pin(top)
        rate = load.run(warmup)
        start = rss_mb(pid)
        rows.append({"phase": "warm-up", "requests": warmup, "req/s": f"{rate:.0f}", "rss MB": f"{start:.1f}"})
        for phase, total in (("pinned", pinned), ("auto", auto)):
            if phase == "auto":
                server.admin("POST", "/admin/mode", json={"mode": "auto"})
            done = 0
            while done < total:
                chunk = min(step, total - done)
                rate = load.run(chunk)
                done += chunk
                rows.append({"phase": phase, "requests": done, "req/s": f"{rate:.0f}", "rss MB": f"{rss_mb(pid):.1f}"})
        end = rss_mb(pid)
        active = server.admin("GET", "/admin/active")
    print_rows(console, f"dyce-serve RSS, pid {pid}", rows)
    return {
        "rss_growth_pct": (end - start) / start * 100,
        "rss_start_mb": start,
        "rss_end_mb": end,
        "rss_peak_mb": max(float(row["rss MB"]) for row in rows),
        "requests": warmup + pinned + auto,
        "warmup": warmup,
        "pinned": pinned,
        "auto": auto,
        "errors": load.errors,
        "refused_429": load.statuses.get("429", 0),
        "statuses": load.statuses,
        "pinned_index": top,
        "final_tier": active["tier"]["bank_index"],
        "final_mode": active["mode"],
        "concurrency": concurrency,
        "cpu": cpu_summary(),
        "gpu": gpu_summary(),
        "load": os.getloadavg(),
        "artifacts": str(artifacts),
    }


def main(
    artifacts: Path = typer.Option(Path("artifacts"), help="artefacts built by `dyce-offline build`"),
    small: bool = typer.Option(False, help="build the small test artefacts (tests/conftest.py) in a temp dir"),
    warmup: int = typer.Option(2000, help="requests before the starting RSS is taken"),
    pinned: int = typer.Option(30_000, help="requests with the top tier pinned (manual mode)"),
    auto: int = typer.Option(5000, help="requests with the autoswitcher on"),
    concurrency: int = typer.Option(8, help="closed-loop clients"),
    step: int = typer.Option(5000, help="requests between RSS samples"),
) -> None:
    with tempfile.TemporaryDirectory(prefix="dyce-soak-") as scratch:
        if small:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.conftest import build_core_demo_artifacts

            console.print("building the small test artefacts (a few seconds)")
            artifacts = build_core_demo_artifacts(Path(scratch) / "artifacts")
        elif not (artifacts / "bank.json").is_file():
            console.print(
                f"no artefacts in {artifacts}: build them with `dyce-offline build --artifacts {artifacts}` "
                "(or `make serve`), or pass --small for the small test artefacts"
            )
            raise typer.Exit(2)
        result = soak(artifacts, warmup, pinned, auto, concurrency, step)
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
