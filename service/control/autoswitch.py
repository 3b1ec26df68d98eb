"""Load-driven tier selection.

Every tick the switcher compares the arrival rate of the last window with each tier's
capacity and picks the most accurate tier that runs below the target utilisation and whose
steady-state batches (see ``steady_batch_time``) keep a request within the SLO. A tier is left
downward as soon as it is overloaded (or the observed latency p95 misses the SLO, which means
its estimate is too optimistic) after a short dwell, and climbed to only with extra headroom
(hysteresis) after a longer dwell, so steady load never flaps. A manual pin turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..engine.batcher import BatchReport
from ..engine.tiers import ActiveTier, Tier, TierState
from ..settings import Settings
from .costs import CostModel
from .load import LoadWindow

log = logging.getLogger("dyce.service.autoswitch")

# A request that arrives while a pipeline step runs waits for that step, then for its own: its
# latency is about two step times, which is what the SLO is compared with.
STEPS_A_REQUEST_WAITS = 2
# Climb to a more accurate tier only while the measured p95 is under this share of the SLO, so
# the climb's extra cost does not land the server right back over its objective.
CLIMB_BELOW_SLO_SHARE = 0.8

DecisionListener = Callable[[str], None]


class Autoswitcher:
    def __init__(
        self,
        settings: Settings,
        state: TierState,
        costs: CostModel,
        listeners: list[DecisionListener] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.costs = costs
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
