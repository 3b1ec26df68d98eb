"""The running service: model, tier state, batcher and autoswitcher, wired together by events.

Built in two steps so the HTTP side can answer before the model is warm: ``load`` (artefacts,
fails start-up with a clear error) then ``warm_up`` (executor, calibration) after which
``ready`` turns true.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from starlette.requests import Request

from dyce.pipeline import EarlyExitPipeline

from .autoswitch import Autoswitcher, CostModel
from .batcher import BatchObserver, BatchReport, DynamicBatcher, JobResult, Reservation
from .decode import pixels
from .errors import BadRequest, ClientGone, NotReady, Timeout
from .metrics import Metrics
from .runtime import ActiveTier, ModelRuntime, Tier, TierState
from .settings import Settings

log = logging.getLogger("dyce.service")

# Small images decode on the event loop: for a 28x28 PNG the hop to a thread costs more than
# the decoding (~0.2 ms). Anything larger decodes in a thread, so the loop never stalls on it.
INLINE_DECODE_PIXELS = 64 * 64


@dataclass(frozen=True)
class Admission:
    """A request let in: the tier it will run under and the queue room held for its images."""

    tier: Tier
    requested: bool  # the client chose the tier
    overrides_active: bool
    reservation: Reservation


@dataclass(frozen=True)
class Served:
    """A request's answer from the model, with the tier it ran under and where time went."""

    result: JobResult
    requested: bool  # the client chose the tier
    total_s: float


class Service:
    def __init__(self, settings: Settings, runtime: ModelRuntime | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.ready = False
        self.metrics.model_ready.set_function(lambda: float(self.ready))
        self.runtime: ModelRuntime | None = runtime  # loaded already by dyce-serve, or in ``load``
        self.fatal: str | None = None  # why the service can no longer serve (liveness fails)
        self.on_fatal: list[Callable[[str], None]] = []
        self.state: TierState | None = None
        self.batcher: DynamicBatcher | None = None
        self.autoswitcher: Autoswitcher | None = None
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="dyce-decode")
        self._batch_observers: list[BatchObserver] = [self.metrics.batch_done, self._count_request_tier]

    # Life cycle ---------------------------------------------------------------------------
    async def load(self) -> None:
        if self.runtime is None:
            self.runtime = await asyncio.to_thread(ModelRuntime, self.settings)
        self.metrics.model_loaded(self.runtime.backbone_positions, self.runtime.saver_stage)
        self.state = TierState(self.runtime.initial_bank, self.settings.autoswitch, [self._tier_changed])
        self.batcher = DynamicBatcher(
            EarlyExitPipeline(self.runtime.executor, self.settings.max_batch_size),
            max_delay_s=self.settings.max_queue_delay_ms / 1e3,
            max_wait_s=self.settings.max_pipeline_wait_ms / 1e3,
            capacity=self.settings.queue_capacity,
            observers=[self._observe_after_answers],
            capacity_images=self.settings.queue_capacity_images,
            capacity_bytes=self.settings.queue_capacity_bytes,
            position_offset=self.runtime.position_offset,
        )
        self._image_bytes = 4 * math.prod(self.runtime.input_shape)  # one decoded float32 image
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)

    async def warm_up(self) -> None:
        runtime, state = self._loaded()
        started = time.perf_counter()
        frontier = state.active.tier.frontier()
        await asyncio.to_thread(runtime.warm_up, state.bank)
        costs = await asyncio.to_thread(
            CostModel.calibrate, runtime, frontier, self.settings.max_batch_size, self.settings.calibration_rounds
        )
        self.autoswitcher = Autoswitcher(
            self.settings, state, costs, lambda: self.batcher.queued_images, [self._count_decision]
        )
        self._batch_observers.append(self.autoswitcher.batch_done)
        self.batcher.start(on_death=lambda: self.fail("the inference worker (batcher) stopped"))
        self.autoswitcher.start()
        self.ready = True
        log.info("ready: warmed up and calibrated %d tiers in %.1f s", len(frontier), time.perf_counter() - started)

    @property
    def live(self) -> bool:
        return self.fatal is None

    def fail(self, reason: str) -> None:
        """The service cannot serve any more: not ready, not live, and whoever runs it is told."""
        if self.fatal is not None:
            return
        self.fatal, self.ready = reason, False
        log.critical("%s; the server can no longer serve", reason)
        for listener in self.on_fatal:
            listener(reason)

    async def stop(self) -> None:
        self.ready = False
        if self.autoswitcher is not None:
            await self.autoswitcher.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def _loaded(self) -> tuple[ModelRuntime, TierState]:
        if self.runtime is None or self.state is None:
            raise NotReady("the model is still loading")
        return self.runtime, self.state

    # Event wiring (metrics stay out of the model path) ------------------------------------
    def _tier_changed(self, active: ActiveTier) -> None:
        self.metrics.active_index.set(active.tier.index)
        self.metrics.active_lambda.set(active.tier.lam)
        if active.reason != "startup":
            self.metrics.switches.labels(reason=active.reason).inc()

    def _observe_after_answers(self, report: BatchReport) -> None:
        # The batcher reports a step before the handlers it answered resume; scheduled after them,
        # the bookkeeping (histograms, exit counts, the autoswitcher's window: ~0.2 ms a step)
        # comes after their responses are written instead of before. It still runs before any
        # request the loop reads later, so a scrape that follows an answer sees its step.
        asyncio.get_running_loop().call_soon(self._observe, report)

    def _observe(self, report: BatchReport) -> None:
        for observer in self._batch_observers:
            try:
                observer(report)
            except Exception:  # bookkeeping must never stop serving
                log.exception("batch observer %r failed", observer)

    def _count_request_tier(self, report: BatchReport) -> None:
        if report.overrides:
            self.metrics.switches.labels(reason="request").inc(report.overrides)

    def _count_decision(self, action: str) -> None:
        self.metrics.autoswitch_decisions.labels(action=action).inc()

    # Request path -------------------------------------------------------------------------
    def require_ready(self) -> tuple[ModelRuntime, TierState]:
        if not self.ready:
            raise NotReady("the model is loading or warming up; poll /v2/health/ready")
        return self._loaded()

    @contextlib.contextmanager
    def admit(
        self, images: int, encoded_bytes: int, lam: float | None = None, max_relative_macs: float | None = None
    ) -> Iterator[Admission]:
        """Let a request in, or refuse it (429), before any of its images is decoded.

        Every request is admitted the same way, whichever tier it runs under and whatever the
        mode: its images must fit the latency objective at that tier's cost, and the queue's
        room in requests, images and bytes (encoded + decoded) is held for it while it decodes.
        The room is given back when the request leaves (``classify`` hands it to the queue).
        """
        _, state = self.require_ready()
        if images < 1:
            raise BadRequest("no image in the request")
        if images > self.settings.max_batch_size:
            raise BadRequest(f"{images} images in one request; at most {self.settings.max_batch_size}")
        requested = state.resolve(lam, max_relative_macs)
        active = state.active.tier
        tier: Tier = requested or active
        self.autoswitcher.arrived(images)
        self.autoswitcher.admit(images, tier)
        reservation = self.batcher.reserve(images, encoded_bytes + images * self._image_bytes)
        try:
            yield Admission(tier, requested is not None, tier.config != active.config, reservation)
        finally:
            self.batcher.release(reservation)

    async def decode(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded images -> one batch tensor; pixel work off the event loop unless tiny, in a
        pool of ``decode_threads`` so concurrent large decodes have bounded memory."""
        runtime, _ = self.require_ready()
        decoder = runtime.decoder
        images = [decoder.open(blob) for blob in blobs]  # headers only: checks limits, cheap
        if sum(pixels(image) for image in images) <= INLINE_DECODE_PIXELS:
            return torch.stack([decoder.tensor(image) for image in images])
        loop = asyncio.get_running_loop()
        return torch.stack(await loop.run_in_executor(self._decode_pool, lambda: [decoder.tensor(i) for i in images]))

    async def classify(self, request: Request, images: torch.Tensor, admission: Admission, arrived: float) -> Served:
        """Queue ``images`` under the admitted tier and wait for the answer, the deadline or a disconnect."""
        tier, requested = admission.tier, admission.requested
        job = self.batcher.submit(images, tier, admission.overrides_active, admission.reservation)
        remaining = self.settings.request_timeout_s - (time.perf_counter() - arrived)
        left = False

        def client_left(_: asyncio.Future[None]) -> None:
            nonlocal left
            if not job.future.done():
                left = True
                job.future.cancel()

        # The handler awaits the job's own future, so the answer wakes it directly; asyncio.wait
        # would add a callback hop, after the batch's bookkeeping instead of before it.
        gone = asyncio.ensure_future(_disconnected(request))
        gone.add_done_callback(client_left)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                result = await job.future
        except TimeoutError:
            # the deadline cancelled the future: still queued, the batcher skips it; running, its rows are discarded
            raise Timeout(f"no answer within the {self.settings.request_timeout_s:g} s request timeout") from None
        except asyncio.CancelledError:
            if left:
                raise ClientGone("client disconnected before the answer was ready") from None
            raise
        finally:
            gone.remove_done_callback(client_left)
            gone.cancel()
        return Served(result, requested, time.perf_counter() - arrived)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read already, so only disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
