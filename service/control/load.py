"""The recent load: arrivals (images) and request latencies over a sliding window."""

from __future__ import annotations

import time
from collections import deque

import numpy as np


class LoadWindow:
    """Arrivals (images) and request latencies (enqueue -> answer) of the last ``horizon_s`` seconds."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._latencies: deque[tuple[float, float]] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self.horizon_s
        while self._arrivals and self._arrivals[0][0] < horizon:
            self._arrivals.popleft()
        while self._latencies and self._latencies[0][0] < horizon:
            self._latencies.popleft()

    # Writers trim too: readers are skipped while the tier is pinned, and a window that only
    # readers trimmed would grow with every request of a pinned replica.
    def arrived(self, images: float, at: float | None = None) -> None:
        now = time.monotonic() if at is None else at
        self._arrivals.append((now, images))
        self._trim(now)

    def answered(self, latencies: list[float]) -> None:
        now = time.monotonic()
        self._latencies.extend((now, latency) for latency in latencies)
        self._trim(now)

    def __len__(self) -> int:
        return len(self._arrivals) + len(self._latencies)

    def rate(self, span_s: float) -> float:
        """Images per second over the last ``span_s`` seconds."""
        now = time.monotonic()
        self._trim(now)
        return sum(n for t, n in self._arrivals if t >= now - span_s) / span_s

    def latency_p95(self, span_s: float) -> float:
        now = time.monotonic()
        self._trim(now)
        latencies = [latency for t, latency in self._latencies if t >= now - span_s]
        return float(np.percentile(latencies, 95)) if latencies else 0.0
