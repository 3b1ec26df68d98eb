"""The engine: model, tier state, batcher, autoswitcher and admission, wired together by events.

Built in two steps so the HTTP side can answer before the model is warm: ``load`` (artefacts,
fails start-up with a clear error) then ``warm_up`` (executor, calibration) after which
``ready`` turns true. The engine runs on one event loop (its process's) and never touches HTTP:
the edge reaches it through the ``EngineHandle`` methods, directly or over ``remote``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import torch

from dyce.pipeline import EarlyExitPipeline

from ..control.admission import Admission, AdmissionControl
from ..control.autoswitch import Autoswitcher
from ..control.costs import CostModel
from ..errors import BadRequest, NotReady, Unprocessable
from ..metrics import Metrics
from ..schemas import (
    ActiveInfo,
    BankEntryInfo,
    BankInfo,
    CostInfo,
    ModeRequest,
    ReloadRequest,
    SaverInfo,
    SwitchRequest,
    TierInfo,
)
from ..settings import Settings
from .api import Answer, Health, ModelInfo
from .batcher import BatchObserver, BatchReport, DynamicBatcher
from .model import ModelRuntime
from .tiers import ActiveTier, Tier, TierState

log = logging.getLogger("dyce.service")


class Engine(Health):
    def __init__(self, settings: Settings, runtime: ModelRuntime | None = None, metrics: Metrics | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.runtime: ModelRuntime | None = runtime  # loaded already by dyce-serve, or in ``load``
        self.on_fatal.append(lambda _: self.metrics.model_ready.set(0))
        self.on_ready: list[Callable[[], None]] = []
        self.state: TierState | None = None
        self.batcher: DynamicBatcher | None = None
        self.autoswitcher: Autoswitcher | None = None
        self.admission_control: AdmissionControl | None = None
        self._batch_observers: list[BatchObserver] = [self.metrics.batch_done, self._count_request_tier]
        self.metrics.model_ready.set(0)

    # Life cycle ---------------------------------------------------------------------------
    async def load(self) -> None:
        if self.runtime is None:
            self.runtime = await asyncio.to_thread(ModelRuntime, self.settings)
        runtime = self.runtime
        self.metrics.model_loaded(runtime.backbone_positions, runtime.saver_stage)
        self.state = TierState(runtime.initial_bank, self.settings.autoswitch, [self._tier_changed])
        self.batcher = DynamicBatcher(
            EarlyExitPipeline(runtime.executor, self.settings.max_batch_size),
            max_delay_s=self.settings.max_queue_delay_ms / 1e3,
            max_wait_s=self.settings.max_pipeline_wait_ms / 1e3,
            capacity=self.settings.queue_capacity,
            observers=[self._observe_after_answers],
            capacity_images=self.settings.queue_capacity_images,
            capacity_bytes=self.settings.queue_capacity_bytes,
            position_offset=runtime.position_offset,
        )
        self.metrics.watch_queue(lambda: self.batcher.depth if self.batcher else 0)
        self._info = ModelInfo(runtime.labels, runtime.input_shape, runtime.backbone_positions, runtime.preprocess)

    def start_warm_up(self) -> asyncio.Task[None]:
        """Warm up in the background, so health probes answer meanwhile; a failure is fatal."""
        task = asyncio.get_running_loop().create_task(self.warm_up(), name="dyce-warm-up")

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and (err := task.exception()) is not None:
                log.debug("warm-up failed", exc_info=err)
                self.fail(f"warm-up failed: {type(err).__name__}: {err}")

        task.add_done_callback(done)
        return task

    async def warm_up(self) -> None:
        runtime, state = self._loaded()
        started = time.perf_counter()
        frontier = state.active.tier.frontier()
        await asyncio.to_thread(runtime.warm_up, state.bank)
        costs = await asyncio.to_thread(
            CostModel.calibrate, runtime, frontier, self.settings.max_batch_size, self.settings.calibration_rounds
        )
        self.autoswitcher = Autoswitcher(self.settings, state, costs, [self._count_decision])
        self._batch_observers.append(self.autoswitcher.batch_done)
        self.admission_control = AdmissionControl(
            self.settings, state, costs, self.batcher, self.info.decoded_image_bytes, self.autoswitcher.arrived
        )
        self.batcher.start(on_death=lambda: self.fail("the inference worker (batcher) stopped"))
        self.autoswitcher.start()
        self._ready = True
        self.metrics.model_ready.set(1)
        for listener in self.on_ready:
            listener()
        log.info("ready: warmed up and calibrated %d tiers in %.1f s", len(frontier), time.perf_counter() - started)

    async def stop(self) -> None:
        self._ready = False
        if self.autoswitcher is not None:
            await self.autoswitcher.stop()
        if self.batcher is not None:
            await self.batcher.stop()

    def _loaded(self) -> tuple[ModelRuntime, TierState]:
        if self.runtime is None or self.state is None:
            raise NotReady("the model is still loading")
        return self.runtime, self.state

    def require_ready(self) -> tuple[ModelRuntime, TierState]:
        self.check_ready()
        return self._loaded()

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

    # Requests ------------------------------------------------------------------------------
    def admission(
        self, images: int, encoded_bytes: int, lam: float | None = None, max_relative_macs: float | None = None
    ) -> contextlib.AbstractContextManager[Admission]:
        """Let a request in, or refuse it (429), before any of its images is decoded
        (``service.control.admission``)."""
        self.require_ready()
        return self.admission_control.admit(images, encoded_bytes, lam, max_relative_macs)

    def submit(self, admission: Admission, images: torch.Tensor) -> asyncio.Future[Answer]:
        """Queue admitted images in the room their admission holds; the future is the answer."""
        job = self.batcher.submit(
            images, admission.tier, admission.requested, admission.overrides_active, admission.reservation
        )
        return job.future

    def enqueue(
        self, images: torch.Tensor, encoded_bytes: int, lam: float | None, max_relative_macs: float | None
    ) -> asyncio.Future[Answer]:
        """Admit and submit in one step: images a remote edge decoded already."""
        with self.admission(images.shape[0], encoded_bytes, lam, max_relative_macs) as admitted:
            return self.submit(admitted, images)

    # Operators -----------------------------------------------------------------------------
    async def bank_info(self) -> BankInfo:
        runtime, state = self.require_ready()
        active = state.active.tier
        bank = active.bank
        entries = []
        for tier in (Tier(bank, i) for i in range(len(bank.entries))):
            entry = tier.entry
            entries.append(
                BankEntryInfo(
                    **TierInfo.of(tier).model_dump(),
                    algorithm=entry.algorithm,
                    dominated=entry.dominated,
                    active=tier.index == active.index,
                    exits=entry.config.exits,
                    thresholds=entry.config.thresholds,
                    test_accuracy=entry.test.accuracy if entry.test else None,
                    test_relative_macs=entry.test.relative_macs if entry.test else None,
                    expected_relative_latency=entry.search.relative_latency,
                    expected_saver_share=entry.search.exit_rates[0] if bank.saver_stage else None,
                )
            )
        return BankInfo(
            backbone=bank.backbone.name,
            num_positions=bank.num_positions,
            savers=[
                SaverInfo(index=s.index, kind=s.kind, relative_macs=bank.macs.relative_exit(0, s.index))
                for s in bank.savers
            ],
            original_accuracy=bank.original_accuracy,
            cost=CostInfo(
                kind=bank.cost.kind,
                where=bank.cost.where.model_dump() if bank.cost.where else None,
                batch=bank.cost.batch,
                profiled_elsewhere=runtime.costed_elsewhere(bank),
            ),
            entries=entries,
        )

    async def active_info(self) -> ActiveInfo:
        _, state = self.require_ready()
        return ActiveInfo.of(state.active)

    async def switch(self, request: SwitchRequest) -> ActiveInfo:
        """Switch the active tier and pin it (manual mode) until a mode request says auto."""
        _, state = self.require_ready()
        chosen = {k: v for k, v in request.model_dump().items() if v is not None}
        if len(chosen) != 1:
            raise BadRequest("give exactly one of: lambda, index, max_relative_macs, min_accuracy")
        bank = state.bank
        if request.lam is not None:
            index = bank.nearest_lambda(request.lam)
        elif request.index is not None:
            index = request.index
        elif request.max_relative_macs is not None:
            index = bank.within_macs(request.max_relative_macs)
        else:
            index = bank.reaching_accuracy(request.min_accuracy)
        if index is None:
            raise Unprocessable(f"no bank entry satisfies {chosen}")
        return ActiveInfo.of(state.switch(index, "admin", mode="manual"))

    async def set_mode(self, request: ModeRequest) -> ActiveInfo:
        _, state = self.require_ready()
        return ActiveInfo.of(state.set_mode(request.mode))

    async def reload(self, request: ReloadRequest | None) -> ActiveInfo:
        """Load a bank file; one that does not validate against the loaded model is refused whole."""
        runtime, state = self.require_ready()
        bank = await asyncio.to_thread(runtime.load_bank, request.path if request else None)
        return ActiveInfo.of(state.replace_bank(bank))
