"""Bounded queue + dynamic batcher in front of the core's continuous early-exit pipeline.

Handlers ``submit`` a job (one request's images, already decoded, bound to one tier) and await
its future. One asyncio task admits whatever queued up and hands it to a one-thread pool, where
``dyce.pipeline.EarlyExitPipeline`` runs it: every segment runs on full batches, survivors of an
exit wait at their position for later arrivals, and each sample carries its own configuration,
so a switch never changes a sample in flight and every answer comes from exactly one
configuration. Under load torch never runs on the event loop; only a step that is all the work
the batcher has, and whose shape (configurations, images) was measured short before, runs on it
(``INLINE_STEP_S``).

The inference thread does not go back to the loop between steps: when a step ends and more
jobs are queued, it admits them itself and runs the next step, and hands each step's answers to
the loop as it goes (``call_soon_threadsafe``). Returning to the loop first left the model idle
while the loop got round to resuming the batcher behind the HTTP work queued before it: on a
2-core host under load, a gap of 0.6 ms at the median (2.5 ms mean) between steps of ~6 ms.
The queue and its counters are shared under a lock; the jobs inside the pipeline (``_inside``)
belong to whichever side runs the step, and only one does at a time.

Partial batches run (``flush``) when nothing else is queued, or when the oldest sample inside
the pipeline has waited ``max_wait_s``: under sustained load the rare sample that reaches a
deep position would otherwise wait for companions that come slowly.

A job whose future is already done when it would be admitted (its request timed out, or the
client went away) is dropped before any model work is spent on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from dyce.config import ExitConfiguration
from dyce.pipeline import EarlyExitPipeline, ExitedSamples

from ..errors import QueueFull
from .api import Answer
from .tiers import Tier

log = logging.getLogger("dyce.service")


@dataclass(eq=False)
class Reservation:
    """Room in the queue held for a request between admission and ``submit`` (while it decodes)."""

    images: int
    nbytes: int
    held: bool = True


@dataclass(eq=False)
class Job:
    images: torch.Tensor  # (k, C, H, W)
    tier: Tier
    requested: bool  # the client chose the tier
    overrides_active: bool  # ... and it is not the active one
    future: asyncio.Future[Answer]
    nbytes: int = 0  # what the request holds in memory while queued (encoded + decoded)
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    admitted_with: int = 0  # images admitted in the same step
    # Filled as rows leave the pipeline.
    probabilities: torch.Tensor | None = None
    exit_positions: np.ndarray | None = None
    relative_macs: np.ndarray | None = None
    remaining: int = 0

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class BatchReport:
    """What observers (metrics, autoswitcher) learn about every pipeline step."""

    admitted: int  # images that entered the pipeline
    completed: int  # images that left it
    inference_s: float
    queue_waits_s: list[float]  # one per admitted job
    latencies_s: list[float]  # enqueue -> answer, one per job completed in this step
    configs: frozenset[ExitConfiguration]  # of the images that left
    overrides: int  # admitted jobs that run under a tier of their own choosing
    exit_positions: np.ndarray
    relative_macs: np.ndarray


BatchObserver = Callable[[BatchReport], None]

# A step this short runs on the event loop itself when it is all the work the batcher has: the
# hop to the inference thread and back costs more (~0.6 ms of a 1 ms answer on a 2-core VM).
# Whatever else the loop has (requests still being read or decoded) waits at most this long.
# Under load, for a step shape not measured yet, or one that took longer, steps run on the
# inference thread, so the loop keeps reading and decoding requests.
INLINE_STEP_S = 0.002
STEP_EWMA = 0.2
MAX_STEP_SHAPES = 1024


class DynamicBatcher:
    def __init__(
        self,
        pipeline: EarlyExitPipeline,
        max_delay_s: float,
        max_wait_s: float,
        capacity: int,
        observers: list[BatchObserver] | None = None,
        capacity_images: int | None = None,
        capacity_bytes: int | None = None,
        position_offset: int = 0,
    ) -> None:
        """``position_offset``: how far a saver stage shifts the pipeline's positions; jobs and
        reports carry backbone positions (-1: the saver), whatever runs in front."""
        self.pipeline = pipeline
        self.position_offset = position_offset
        self.max_batch = pipeline.batch_size
        self.max_delay_s = max_delay_s
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.capacity_images = capacity_images or capacity * self.max_batch
        self.capacity_bytes = capacity_bytes
        self.observers = list(observers or [])
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._queued_bytes = 0
        # The queue and its two counters: the loop appends, the loop or the inference thread takes.
        self._queue_lock = threading.Lock()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        # Admitted requests still decoding: they count against every capacity.
        self._reserved_requests = self._reserved_images = self._reserved_bytes = 0
        self._inside: dict[int, Job] = {}  # jobs with images in the pipeline, by id
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dyce-infer")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # How long idle steps take, by (their configurations, their images): the step's own time,
        # wherever it ran, averaged so one slow step on a busy host does not flip the choice. A
        # step runs inline only once one of the same shape has been measured short.
        self._idle_steps_s: dict[tuple[frozenset[ExitConfiguration], int], float] = {}
        self._last_step_s = 0.0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def queued_images(self) -> int:
        """Images waiting for the pipeline, including those of admitted requests still decoding."""
        return self._queued_images + self._reserved_images

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes + self._reserved_bytes

    def start(self, on_death: Callable[[], None] | None = None) -> None:
        """Run the serving loop; ``on_death`` is called if it ever ends other than by ``stop``."""

        def died(task: asyncio.Task[None]) -> None:
            if self._stopping:
                return
            log.critical(
                "the batcher stopped; requests will time out",
                exc_info=None if task.cancelled() else task.exception(),
            )
            if on_death is not None:
                on_death()

        self._event_loop = asyncio.get_running_loop()
        self._task = self._event_loop.create_task(self._loop(), name="dyce-batcher")
        self._task.add_done_callback(died)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)  # a step in flight ends, and takes no more jobs
        for job in [*self._queue, *self._inside.values()]:
            if not job.future.done():
                job.future.cancel()
        with self._queue_lock:
            self._queue.clear()
            self._queued_images = self._queued_bytes = 0

    def reserve(self, images: int, nbytes: int) -> Reservation:
        """Hold room for a request before its images are decoded; 429 when any capacity is spent."""
        full = None
        # Read without the lock: the inference thread only ever shrinks the queue meanwhile.
        if len(self._queue) + self._reserved_requests >= self.capacity:
            full = f"{self.capacity} requests waiting"
        elif self.queued_images + images > self.capacity_images:
            full = f"{self.queued_images} images waiting, the limit is {self.capacity_images}"
        elif self.capacity_bytes is not None and self.queued_bytes + nbytes > self.capacity_bytes:
            full = f"{self.queued_bytes} bytes of images waiting, the limit is {self.capacity_bytes}"
        if full is not None:
            raise QueueFull(f"queue is full ({full}); retry shortly", headers={"Retry-After": "1"})
        self._reserved_requests += 1
        self._reserved_images += images
        self._reserved_bytes += nbytes
        return Reservation(images, nbytes)

    def release(self, reservation: Reservation) -> None:
        if reservation.held:
            reservation.held = False
            self._reserved_requests -= 1
            self._reserved_images -= reservation.images
            self._reserved_bytes -= reservation.nbytes

    def submit(
        self, images: torch.Tensor, tier: Tier, requested: bool, overrides_active: bool, reservation: Reservation
    ) -> Job:
        """Queue a request's images in the room its reservation held."""
        if not reservation.held:
            raise RuntimeError("submit needs a reservation that is still held")
        self.release(reservation)
        future = asyncio.get_running_loop().create_future()
        job = Job(images, tier, requested, overrides_active, future, reservation.nbytes)
        with self._queue_lock:
            self._queue.append(job)
            self._queued_images += job.size
            self._queued_bytes += job.nbytes
        self._wakeup.set()
        return job

    async def _admissible(self) -> list[Job]:
        """Queued jobs to admit: at least one unless the pipeline still holds work."""
        while not self._queue and not self._inside:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._queue and not self._inside and self.max_delay_s > 0:
            deadline = time.perf_counter() + self.max_delay_s
            while self._queued_images < self.max_batch and (remaining := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
        return self._take()

    def _take(self) -> list[Job]:
        """Up to a batch of queued jobs, now inside the pipeline; on the loop, or on the inference
        thread between steps (never both: the loop only takes while no step runs)."""
        jobs, images = [], 0
        with self._queue_lock:
            while self._queue and images < self.max_batch:
                job = self._queue.popleft()
                self._queued_images -= job.size
                self._queued_bytes -= job.nbytes
                if job.future.done():
                    continue  # answered already (timeout, disconnect): spend nothing on it
                jobs.append(job)
                images += job.size
        now = time.perf_counter()
        for job in jobs:
            job.admitted, job.admitted_with, job.remaining = now, images, job.size
            self._inside[id(job)] = job
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            was_empty = not self._inside
            jobs = await self._admissible()
            if not jobs and not self._inside:
                continue  # everything queued had been answered already
            idle = was_empty and not self._queue  # these jobs are all the work there is
            shape = (frozenset(job.tier.config for job in jobs), sum(job.size for job in jobs))
            try:
                if idle and self._idle_steps_s.get(shape, math.inf) < INLINE_STEP_S:
                    self._advance(jobs, inline=True)
                else:
                    await loop.run_in_executor(self._pool, self._advance, jobs, False)
            except Exception as err:  # a model failure must answer its requests, not kill the loop
                log.exception("the pipeline failed; failing the %d requests inside it", len(self._inside))
                self._fail_inside(err)
                continue
            if idle:
                if len(self._idle_steps_s) >= MAX_STEP_SHAPES:  # bounded whatever banks get loaded
                    self._idle_steps_s.clear()
                known = self._idle_steps_s.get(shape)
                step_s = self._last_step_s
                self._idle_steps_s[shape] = step_s if known is None else known + STEP_EWMA * (step_s - known)

    def _advance(self, jobs: list[Job], inline: bool) -> None:
        """Inference thread (or the loop, when idle and cheap): admit ``jobs``, run every full
        batch, flush partial ones when nothing is queued or the oldest has waited too long, and
        answer what left; on the thread, again with newly queued jobs until none are."""
        first = True
        while True:
            # From admission: on the loop's first step that includes the hop to this thread.
            started = jobs[0].admitted if jobs else time.perf_counter()
            for job in jobs:
                self.pipeline.push(job.images, [(id(job), row) for row in range(job.size)], job.tier.config)
            pushed = time.perf_counter()
            exited: list[ExitedSamples] = []
            while self.pipeline.has_full_batch():
                exited += self.pipeline.step()
            oldest = min((job.admitted for job in self._inside.values()), default=time.perf_counter())
            late = time.perf_counter() - oldest > self.max_wait_s
            # len() of a deque is safe to read from this thread; the loop only appends meanwhile.
            while self.pipeline.waiting() and (late or not self._queue):
                exited += self.pipeline.step(flush=True)
            finished = time.perf_counter()
            if first:  # an idle step's own time, for the choice to run the next one inline
                self._last_step_s, first = finished - pushed, False
            answered, report = self._collect(jobs, exited, started, finished)
            if inline:
                self._answer(answered, report, finished)
                return
            self._event_loop.call_soon_threadsafe(self._answer, answered, report, finished)
            if self._stopping or not self._queue:
                return
            jobs = self._take()
            if not jobs and not self._inside:
                return  # everything queued had been answered already

    def _fail_inside(self, err: Exception) -> None:
        for job in self._inside.values():
            if not job.future.done():
                job.future.set_exception(err)
        self._inside.clear()
        self.pipeline = EarlyExitPipeline(self.pipeline.executor, self.max_batch)

    def _collect(
        self, admitted: list[Job], exited: list[ExitedSamples], started: float, finished: float
    ) -> tuple[list[Job], BatchReport]:
        """Put each exited row in its job; the jobs now complete (out of ``_inside``) and the step's report."""
        answered: list[Job] = []
        positions, costs, latencies = [], [], []
        for group in exited:
            position = group.position - self.position_offset
            # job id -> (its rows, where they sit in this group); a job's rows need not be adjacent
            placement: dict[int, tuple[list[int], list[int]]] = {}
            for i, (job_id, row) in enumerate(group.tags):
                rows, indices = placement.setdefault(job_id, ([], []))
                rows.append(row)
                indices.append(i)
            for job_id, (rows, indices) in placement.items():
                job = self._inside[job_id]
                if job.probabilities is None:
                    job.probabilities = torch.empty(job.size, group.probabilities.shape[1])
                    job.exit_positions = np.empty(job.size, dtype=np.int64)
                    job.relative_macs = np.empty(job.size, dtype=np.float64)
                job.probabilities[rows] = group.probabilities[indices]
                job.exit_positions[rows] = position
                job.relative_macs[rows] = group.relative_macs
                job.remaining -= len(rows)
                if job.remaining == 0:
                    answered.append(self._inside.pop(job_id))
                    latencies.append(finished - job.enqueued)
            positions += [position] * len(group.tags)
            costs += [group.relative_macs] * len(group.tags)
        report = BatchReport(
            admitted=sum(job.size for job in admitted),
            completed=len(positions),
            inference_s=finished - started,
            queue_waits_s=[job.admitted - job.enqueued for job in admitted],
            latencies_s=latencies,
            configs=frozenset(group.config for group in exited),
            overrides=sum(job.overrides_active for job in admitted),
            exit_positions=np.asarray(positions, dtype=np.int64),
            relative_macs=np.asarray(costs, dtype=np.float64),
        )
        return answered, report

    def _answer(self, answered: list[Job], report: BatchReport, finished: float) -> None:
        """On the loop: resolve the answered jobs' futures, then tell the observers."""
        for job in answered:
            self._complete(job, finished)
        for observer in self.observers:
            try:
                observer(report)
            except Exception:  # bookkeeping must never stop the serving loop
                log.exception("batch observer %r failed", observer)

    @staticmethod
    def _complete(job: Job, finished: float) -> None:
        if job.future.done():
            return  # timed out or abandoned while inside: its rows are discarded
        job.future.set_result(
            Answer(
                probabilities=job.probabilities,
                exit_positions=job.exit_positions,
                relative_macs=job.relative_macs,
                tier=job.tier,
                requested=job.requested,
                queue_s=job.admitted - job.enqueued,
                inference_s=finished - job.admitted,
                batch_size=job.admitted_with,
            )
        )
