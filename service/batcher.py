"""Bounded queue + dynamic batcher in front of the executor (LitServe's request path).

Handlers ``submit`` a job (one request's images, already decoded, bound to one tier) and await
its future. A single asyncio task gathers jobs for up to ``max_delay`` or ``max_batch`` images,
splits the batch by configuration so each executor call runs under exactly one, and hands it
to a one-thread pool: torch never runs on the event loop, and batches never overlap.

A job whose future is already done when its batch forms (its request timed out, or the client
went away) is dropped before any model work is spent on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from dyce.config import ExitConfiguration
from dyce.executor import ExecutionResult

from .errors import QueueFull
from .runtime import Tier

log = logging.getLogger("dyce.service")


@dataclass(eq=False)
class Job:
    images: torch.Tensor  # (k, C, H, W)
    tier: Tier
    overrides_active: bool  # the client asked for a tier other than the active one
    future: asyncio.Future[JobResult]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class JobResult:
    probabilities: torch.Tensor  # (k, num_classes)
    exit_positions: np.ndarray  # (k,)
    relative_macs: np.ndarray  # (k,)
    tier: Tier
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(frozen=True)
class BatchReport:
    """What observers (metrics, autoswitcher) learn about every executor call."""

    config: ExitConfiguration
    overrides_active: bool
    size: int
    inference_s: float
    queue_waits_s: list[float]
    exit_positions: np.ndarray
    relative_macs: np.ndarray


BatchObserver = Callable[[BatchReport], None]
RunBatch = Callable[[torch.Tensor, ExitConfiguration], ExecutionResult]


def _report_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the batcher stopped; requests will time out", exc_info=task.exception())


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int,
        max_delay_s: float,
        capacity: int,
        observers: list[BatchObserver] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self.observers = list(observers or [])
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dyce-infer")
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dyce-batcher")
        self._task.add_done_callback(_report_death)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=True)

    def submit(self, images: torch.Tensor, tier: Tier, overrides_active: bool) -> Job:
        if len(self._queue) >= self.capacity:
            raise QueueFull(
                f"queue is full ({self.capacity} requests waiting); retry shortly", headers={"Retry-After": "1"}
            )
        job = Job(images, tier, overrides_active, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_images += job.size
        self._wakeup.set()
        return job

    def _pop(self) -> Job:
        job = self._queue.popleft()
        self._queued_images -= job.size
        return job

    async def _gather(self) -> list[Job]:
        """Jobs for one batch: wait for the first, then fill up until max_batch or the delay ends."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = time.perf_counter() + self.max_delay_s
        while True:
            if self._queued_images >= self.max_batch:
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        jobs, images = [], 0
        while self._queue and images + self._queue[0].size <= self.max_batch:
            job = self._pop()
            if job.future.done():
                continue  # answered already (timeout, disconnect): spend nothing on it
            jobs.append(job)
            images += job.size
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            groups: dict[ExitConfiguration, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.tier.config, []).append(job)
            for config, group in groups.items():
                started = time.perf_counter()
                try:
                    images = torch.cat([job.images for job in group]) if len(group) > 1 else group[0].images
                    result = await loop.run_in_executor(self._pool, self._run_batch, images, config)
                except Exception as err:  # a model failure must answer its requests, not kill the loop
                    log.exception("executor failed on a batch of %d jobs", len(group))
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                self._deliver(group, result, started, time.perf_counter())

    def _deliver(self, group: list[Job], result: ExecutionResult, started: float, finished: float) -> None:
        inference_s = finished - started
        size = int(result.exit_positions.shape[0])
        positions = result.exit_positions.numpy()
        offset = 0
        for job in group:
            rows = slice(offset, offset + job.size)
            offset += job.size
            if not job.future.done():
                job.future.set_result(
                    JobResult(
                        probabilities=result.probabilities[rows],
                        exit_positions=positions[rows],
                        relative_macs=result.relative_macs[rows],
                        tier=job.tier,
                        queue_s=started - job.enqueued,
                        inference_s=inference_s,
                        batch_size=size,
                    )
                )
        report = BatchReport(
            config=result.config,
            overrides_active=any(job.overrides_active for job in group),
            size=size,
            inference_s=inference_s,
            queue_waits_s=[started - job.enqueued for job in group],
            exit_positions=positions,
            relative_macs=result.relative_macs,
        )
        for observer in self.observers:
            try:
                observer(report)
            except Exception:  # bookkeeping must never stop the serving loop
                log.exception("batch observer %r failed", observer)
