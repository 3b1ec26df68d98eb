"""Shared by the in-process benches: best-of-N wall time and a table of result rows."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` after one warm-up call (CUDA work included)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def print_rows(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
