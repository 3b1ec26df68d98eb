"""Load-driven tier selection.

Cost model per configuration: a pipeline step that completes ``b`` images takes
``overhead + b * per_image`` seconds. ``overhead`` (Python, dispatch, partial batches) is shared;
``per_image`` starts from the plain model's cost, measured at start-up through the serving
pipeline, times the tier's expected relative MACs (see ``CostModel.calibrate``), and then follows
live steps with an exponentially weighted moving average, so it tracks the real input mix and
a busier CPU. Capacity = images per second at full batches.

Every tick the switcher compares the arrival rate of the last window with each tier's
capacity and picks the most accurate tier that runs below the target utilisation and whose
steady-state batches (see ``steady_batch_time``) keep a request within the SLO. A tier is left
downward as soon as it is overloaded (or the observed latency p95 misses the SLO, which means
its estimate is too optimistic) after a short dwell, and climbed to only with extra headroom
(hysteresis) after a longer dwell, so steady load never flaps. A manual pin turns it off;
admission control keeps the queue shorter than what the active tier can drain within the SLO.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dyce.config import ExitConfiguration
from dyce.pipeline import EarlyExitPipeline

from .batcher import BatchReport
from .errors import QueueFull
from .runtime import ActiveTier, ModelRuntime, Tier, TierState
from .settings import Settings

log = logging.getLogger("dyce.service.autoswitch")

# A request that arrives while a pipeline step runs waits for that step, then for its own: its
# latency is about two step times, which is what the SLO is compared with.
STEPS_A_REQUEST_WAITS = 2
# Climb to a more accurate tier only while the measured p95 is under this share of the SLO, so
# the climb's extra cost does not land the server right back over its objective.
CLIMB_BELOW_SLO_SHARE = 0.8

EWMA_ALPHA = 0.2
GUARD_PENALTY = 1.25  # a tier whose requests missed the SLO is trusted this much less


@dataclass
class CostEstimate:
    per_image_s: float
    samples: int = 0


class CostModel:
    def __init__(self, overhead_s: float, per_image: dict[ExitConfiguration, float]) -> None:
        self.overhead_s = overhead_s
        self.estimates = {config: CostEstimate(cost) for config, cost in per_image.items()}

    @classmethod
    def calibrate(cls, runtime: ModelRuntime, tiers: list[Tier], batch: int, rounds: int) -> CostModel:
        """Time the plain model (final head only: the same work for any input) through the
        serving pipeline, median of ``rounds``: one image alone gives the fixed cost, ``4 * batch``
        images the cost per image. Each tier starts at that cost times its expected relative MACs.

        Timing each tier on synthetic inputs would be wrong the other way: noise is not confident,
        so nothing exits early and every tier would look as costly as the plain model. The bank's
        MACs come from real images; the online average then replaces this prior with what the
        tier really costs on the traffic it serves.
        """
        generator = torch.Generator().manual_seed(1)
        one = torch.randn(1, *runtime.input_shape, generator=generator)
        many = torch.randn(4 * batch, *runtime.input_shape, generator=generator)
        plain = ExitConfiguration.final_only(runtime.num_positions)

        def timed(images: torch.Tensor) -> float:
            times = []
            for _ in range(rounds):
                pipeline = EarlyExitPipeline(runtime.executor, batch)
                start = time.perf_counter()
                for chunk in images.split(batch):
                    pipeline.push(chunk, list(range(chunk.shape[0])), plain)
                    while pipeline.has_full_batch():
                        pipeline.step()
                while pipeline.waiting():
                    pipeline.step(flush=True)
                times.append(time.perf_counter() - start)
            # The minimum, not the median: a busy host only ever adds time, and a prior inflated
            # by noise would make every tier look unable to meet the SLO.
            return min(times)

        per_image_plain = timed(many) / many.shape[0]
        overhead = max(timed(one) - per_image_plain, 0.0)
        per_image = {tier.config: per_image_plain * tier.expected_relative_cost for tier in tiers}
        log.info("calibrated the plain model: %.3f ms/image, overhead %.3f ms", per_image_plain * 1e3, overhead * 1e3)
        for tier in tiers:
            log.info(
                "tier %d (lambda %.4g, %.3f relative cost): prior capacity %.0f images/s",
                tier.index, tier.lam, tier.expected_relative_cost,
                batch / (overhead + batch * per_image[tier.config]),
            )  # fmt: skip
        return cls(overhead, per_image)

    def per_image(self, config: ExitConfiguration) -> float:
        estimate = self.estimates.get(config)
        if estimate is None:  # a tier of a reloaded bank: assume the costliest known until measured
            return max(e.per_image_s for e in self.estimates.values())
        return estimate.per_image_s

    def capacity(self, config: ExitConfiguration, batch: int) -> float:
        """Images per second at full batches."""
        return batch / (self.overhead_s + batch * self.per_image(config))

    def steady_batch_time(self, config: ExitConfiguration, batch: int, rate: float) -> float:
        """Duration of the batches the batcher forms at ``rate`` images/s: while one batch of
        ``t`` seconds runs, ``rate * t`` images arrive and form the next, so ``t = a + c * rate * t``;
        at most a full batch."""
        load = rate * self.per_image(config)
        full = self.overhead_s + batch * self.per_image(config)
        return full if load >= 1 else min(self.overhead_s / (1 - load), full)

    def observe(self, report: BatchReport) -> None:
        """Follow a step whose images all ran under one configuration."""
        if report.completed < 2 or len(report.configs) != 1:
            return
        (config,) = report.configs
        observed = max(report.inference_s - self.overhead_s, 0.0) / report.completed
        estimate = self.estimates.setdefault(config, CostEstimate(observed))
        estimate.per_image_s += EWMA_ALPHA * (observed - estimate.per_image_s)
        estimate.samples += 1

    def penalise(self, config: ExitConfiguration) -> None:
        estimate = self.estimates.setdefault(config, CostEstimate(self.per_image(config)))
        estimate.per_image_s *= GUARD_PENALTY


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


DecisionListener = Callable[[str], None]


class Autoswitcher:
    def __init__(
        self,
        settings: Settings,
        state: TierState,
        costs: CostModel,
        queued_images: Callable[[], int],
        listeners: list[DecisionListener] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.costs = costs
        self.queued_images = queued_images
        self.window = LoadWindow(max(settings.autoswitch_window_s, settings.autoswitch_climb_window_s))
        self.listeners = list(listeners or [])
        self.slo_s = settings.slo_p95_ms / 1e3
        if not self.slo_reachable:
            log.warning(
                "the %.0f ms latency objective is below twice the fixed cost of a pipeline step (%.1f ms), which "
                "no tier changes: tiers are chosen by throughput alone",
                settings.slo_p95_ms, costs.overhead_s * 1e3,
            )  # fmt: skip
        self._pressure_since: float | None = None  # since when the active tier is overloaded
        self._calm_since: float | None = None  # since when a better tier would fit
        self._task: asyncio.Task[None] | None = None

    # Observers wired to the request path.
    def arrived(self, images: int) -> None:
        self.window.arrived(images)

    def batch_done(self, report: BatchReport) -> None:
        self.costs.observe(report)
        self.window.answered(report.latencies_s)

    @property
    def slo_reachable(self) -> bool:
        """Whether choosing a tier can bring latency within the SLO at all: a request waits for
        the running step and then for its own, and each costs at least the shared overhead."""
        return STEPS_A_REQUEST_WAITS * self.costs.overhead_s <= self.slo_s

    def admit(self, images: int, tier: Tier) -> None:
        """Refuse work that could not finish within the SLO at the cost of the tier it will run
        under: the active one, a pinned one, or the one the request asked for."""
        capacity = self.costs.capacity(tier.config, self.settings.max_batch_size)
        finish_s = (self.queued_images() + images) / capacity
        if finish_s > self.slo_s:
            raise QueueFull(
                f"overloaded: this request would finish in about {finish_s * 1e3:.0f} ms, past the "
                f"{self.settings.slo_p95_ms:g} ms latency objective; retry shortly",
                headers={"Retry-After": "1"},
            )

    def fits(self, tier: Tier, rate: float, headroom: float) -> bool:
        """Below the target utilisation, and a request's wait for the running batch plus its own
        batch stays within the SLO."""
        batch = self.settings.max_batch_size
        usable = self.costs.capacity(tier.config, batch) * self.settings.autoswitch_target_utilisation * headroom
        if rate > usable:
            return False
        # An SLO that no tier can meet must not push the server down to a cheaper tier for nothing.
        step_s = self.costs.steady_batch_time(tier.config, batch, rate)
        return not self.slo_reachable or STEPS_A_REQUEST_WAITS * step_s <= self.slo_s

    def decide(self) -> tuple[str, int | None]:
        """One decision: (action, bank index to switch to or None)."""
        active = self.state.active
        if active.mode != "auto":
            return "pinned", None
        tiers = active.tier.frontier()
        current = next((t for t in tiers if t.index == active.tier.index), None)
        settle = self.settings
        rate = self.window.rate(settle.autoswitch_window_s)
        # p95 needs more samples than a second of big requests gives: the longer window.
        latency_p95 = self.window.latency_p95(settle.autoswitch_climb_window_s)
        now = time.monotonic()
        dwell = now - active.since_monotonic
        if current is None:  # on a dominated entry (set by hand before): rejoin the frontier
            best = next((t for t in tiers if self.fits(t, rate, 1.0)), tiers[-1])
            return "rejoin", best.index
        position = tiers.index(current)
        overloaded = not self.fits(current, rate, 1.0)
        missing_slo = self.slo_reachable and latency_p95 > self.slo_s
        if overloaded or missing_slo:
            # Debounced: the pressure must last, not just one noisy window.
            self._calm_since = None
            self._pressure_since = self._pressure_since or now
            if min(dwell, now - self._pressure_since) < settle.autoswitch_min_dwell_down_s:
                return "hold_dwell", None
            if position == len(tiers) - 1:
                return "hold_cheapest", None
            if missing_slo and not overloaded:
                self.costs.penalise(current.config)
                return "down", tiers[position + 1].index
            target = next((t for t in tiers[position + 1 :] if self.fits(t, rate, 1.0)), tiers[-1])
            return "down", target.index
        # Climbing looks at a longer window: a lull of a second must not pull it up.
        climb_rate = self.window.rate(settle.autoswitch_climb_window_s)
        headroom = 1.0 - settle.autoswitch_hysteresis
        self._pressure_since = None
        climb = next((t for t in tiers[:position] if self.fits(t, climb_rate, headroom)), None)
        if climb is None or latency_p95 > CLIMB_BELOW_SLO_SHARE * self.slo_s:
            self._calm_since = None
            return "hold", None
        self._calm_since = self._calm_since or now
        if min(dwell, now - self._calm_since) < settle.autoswitch_min_dwell_up_s:
            return "hold_dwell", None
        return "up", climb.index

    def tick(self) -> ActiveTier:
        action, index = self.decide()
        for listener in self.listeners:
            listener(action)
        if index is None:
            return self.state.active
        before = self.state.active.tier
        active = self.state.switch(index, "autoswitch")
        log.info(
            "autoswitch %s: index %d -> %d (lambda %.4g -> %.4g), arrivals %.0f images/s, latency p95 %.1f ms",
            action, before.index, index, before.lam, active.tier.lam,
            self.window.rate(self.settings.autoswitch_window_s),
            self.window.latency_p95(self.settings.autoswitch_climb_window_s) * 1e3,
        )  # fmt: skip
        return active

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dyce-autoswitch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.autoswitch_interval_s)
            try:
                self.tick()
            except Exception:  # a bad decision must not stop future ones
                log.exception("autoswitch tick failed")
