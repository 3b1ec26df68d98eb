"""Prometheus metrics, one ``CollectorRegistry`` per app so several apps (tests) never collide.

With several HTTP worker processes (``DYCE_HTTP_WORKERS``), ``dyce-serve`` sets
``PROMETHEUS_MULTIPROC_DIR`` before any process imports prometheus-client: every process then
writes its own samples to memory-mapped files there (the engine: batches, exits, tiers; the
workers: requests), and ``/metrics`` on any worker reports their sum over the whole server.
Gauges say how processes combine (``multiprocess_mode``): only the engine sets the tier and
queue gauges (the most recent value wins), in-flight requests add up.

Nothing in the model path imports this module: the batcher, the tier state and the
autoswitcher publish events through plain callbacks, and ``Metrics`` subscribes to them.
Labels stay bounded: routes are route templates, statuses are HTTP codes, positions are the
backbone's N positions (plus "saver" for a saver stage in front), reasons and actions are fixed vocabularies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import get_args

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from dyce.savers import backbone_position_label as position_label

from .engine.batcher import BatchReport
from .engine.tiers import SwitchReason
from .errors import rejection_reasons

# Early exits of the demo model finish well under a millisecond; the top buckets cover timeouts.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Every reason a switch is counted under (start-up is the initial tier, not a switch).
SWITCH_REASONS = tuple(r for r in get_args(SwitchReason) if r != "startup")
RELATIVE_MACS_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21)) + (1.5,)


OBSERVE_MANY_FROM = 8


def observe_many(histogram: Histogram, values: np.ndarray | list[float]) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket instead of per value.

    A pipeline step's bookkeeping observed every job's queue wait and every image's cost one by
    one, on the event loop every request shares: 140 us a step for 32 one-image requests, 200 us
    with multi-process metrics, where each update is a locked write to a memory-mapped file. This
    adds the same counts to the same bucket values ``observe`` updates (a value lands in the first
    bucket whose bound it does not exceed); NaN lands in none, as in ``observe``. Below
    ``OBSERVE_MANY_FROM`` values, numpy's fixed cost is more than it saves: those are observed one
    by one (1 value: 2.6 us against 12 us, 8 values: even, 32 values: 55 against 20 us).
    """
    if len(values) < OBSERVE_MANY_FROM:
        for value in values:
            histogram.observe(float(value))
        return
    values = np.asarray(values, dtype=np.float64)
    bounds = histogram._upper_bounds
    buckets = np.searchsorted(bounds, values, side="left")
    counts = np.bincount(buckets[buckets < len(bounds)], minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket in np.flatnonzero(counts):
        histogram._buckets[bucket].inc(int(counts[bucket]))


def multiprocess() -> bool:
    """Whether samples go to the shared directory (decided before prometheus-client was imported)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess()
        self._queue_depth: Callable[[], int] | None = None
        self._exits_by_position: dict[int, Counter] = {}  # children of ``exits``, by position
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}  # routes x statuses
        r = self.registry
        self.requests = Counter("dyce_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "dyce_request_duration_seconds", "Arrival to answer", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_duration = Histogram(
            "dyce_queue_duration_seconds", "Enqueue to batch start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_duration = Histogram(
            "dyce_inference_duration_seconds", "Early-exit pipeline time per step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "dyce_batch_size",
            "Images admitted to the pipeline per step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.exits = Counter("dyce_exits", "Images by the position they left at", ["position"], registry=r)
        self.relative_macs = Histogram(
            "dyce_relative_macs",
            "MACs per image relative to the plain model",
            buckets=RELATIVE_MACS_BUCKETS,
            registry=r,
        )
        self.active_lambda = Gauge(
            "dyce_active_lambda", "Lambda of the active configuration", multiprocess_mode="livemostrecent", registry=r
        )
        self.active_index = Gauge(
            "dyce_active_config_index",
            "Bank index of the active configuration",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.switches = Counter("dyce_config_switches", "Active configuration changes", ["reason"], registry=r)
        self.queue_depth = Gauge(
            "dyce_queue_depth", "Requests waiting for a batch", multiprocess_mode="livemostrecent", registry=r
        )
        self.in_flight = Gauge(
            "dyce_in_flight_requests", "Requests being handled", multiprocess_mode="livesum", registry=r
        )
        self.rejections = Counter("dyce_rejections", "Requests answered with an error", ["reason"], registry=r)
        self.autoswitch_decisions = Counter(
            "dyce_autoswitch_decisions", "Autoswitcher decisions by outcome", ["action"], registry=r
        )
        self.model_ready = Gauge(
            "dyce_model_ready",
            "1 once the model is loaded and warmed up",
            multiprocess_mode="livemostrecent",
            registry=r,
        )

    def model_loaded(self, num_positions: int, saver_stage: bool = False) -> None:
        """Start every exit position and switch reason at 0: a series born with its first
        increment has no earlier sample, so Prometheus's rate() and increase() miss that step."""
        for position in range(-1 if saver_stage else 0, num_positions):
            self._exit_counter(position)
        for reason in SWITCH_REASONS:
            self.switches.labels(reason=reason)

    def edge_started(self) -> None:
        """Start every refusal reason at 0, for the reason ``model_loaded`` starts the exits."""
        for reason in rejection_reasons():
            self.rejections.labels(reason=reason)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """The queue depth: read at scrape time in one process; across processes the scrape
        cannot call into the engine, so the engine writes it after every pipeline step."""
        if self.multiprocess:
            self._queue_depth = depth
            self.queue_depth.set(depth())  # a stamped value, so the series exists before the first step
        else:
            self.queue_depth.set_function(depth)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or the whole server's files."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)

    content_type = CONTENT_TYPE_LATEST

    # Callbacks the service components are wired to.
    def batch_done(self, report: BatchReport) -> None:
        if self._queue_depth is not None:
            self.queue_depth.set(self._queue_depth())
        if report.admitted:
            self.batch_size.observe(report.admitted)
        self.inference_duration.observe(report.inference_s)
        observe_many(self.queue_duration, report.queue_waits_s)
        if report.exit_positions.size:
            counts = np.bincount(report.exit_positions + 1)  # positions start at -1 (a saver)
            for position in np.flatnonzero(counts) - 1:
                self._exit_counter(int(position)).inc(int(counts[position + 1]))
        observe_many(self.relative_macs, report.relative_macs)

    def _exit_counter(self, position: int) -> Counter:
        counter = self._exits_by_position.get(position)
        if counter is None:  # started by model_loaded, or a position a later bank added
            counter = self._exits_by_position[position] = self.exits.labels(position=position_label(position))
        return counter

    def request_done(self, route: str, status: int, seconds: float, reason: str | None) -> None:
        children = self._request_children.get((route, status))
        if children is None:  # labels() validates its arguments on every call: ~40 % of this
            children = (
                self.requests.labels(route=route, status=str(status)),
                self.request_duration.labels(route=route),
            )
            self._request_children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        if reason is not None:
            self.rejections.labels(reason=reason).inc()
