"""Timing a call the way every measurement in the core does: one untimed call first (kernel
set-up, allocator, caches), then the median of timed calls, with the device's queued work
waited for on both sides, so a GPU call is timed to its end and not to its launch."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def median_time(fn: Callable[[], T], repeats: int, device: torch.device, budget_s: float = math.inf) -> tuple[float, T]:
    """Median seconds of up to ``repeats`` timed calls of ``fn``, and the last call's result.
    Stops early once the timed calls add up to ``budget_s``: long calls vary little relative to
    their length."""
    out = fn()
    times: list[float] = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        out = fn()
        _synchronize(device)
        times.append(time.perf_counter() - started)
        if sum(times) > budget_s:
            break
    return statistics.median(times), out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
