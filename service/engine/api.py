"""What the HTTP edge needs of the engine, in one process or across processes.

The edge holds an ``EngineHandle``: the ``Engine`` itself when both live in one process, or a
``RemoteEngine`` (``service.engine.remote``) in each HTTP worker process. Both admit, submit
and operate the same way, so routes never know which one they talk to.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dyce.preprocess import PreprocessSpec

from ..errors import NotReady
from ..schemas import ActiveInfo, BankInfo, ModeRequest, ReloadRequest, SwitchRequest
from ..settings import Settings


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model as the edge sees it: fixed from start-up on."""

    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    backbone_positions: int  # what clients see as num_positions (a saver stage is position -1)
    preprocess: PreprocessSpec

    @property
    def decoded_image_bytes(self) -> int:
        """What one decoded image holds in memory (float32)."""
        return 4 * math.prod(self.input_shape)


@dataclass(frozen=True)
class TierSummary:
    """A tier as an answer reports it (``TierInfo.of`` reads these fields from a Tier or from this)."""

    index: int
    lam: float
    config_id: str
    expected_accuracy: float
    expected_relative_macs: float


@dataclass(frozen=True)
class Answer:
    """A request's images answered by one tier."""

    probabilities: torch.Tensor  # (k, num_classes)
    exit_positions: np.ndarray  # (k,) backbone positions, -1: a saver
    relative_macs: np.ndarray  # (k,)
    tier: Any  # a Tier, or its TierSummary across processes: the fields of TierSummary
    requested: bool  # the client chose the tier
    queue_s: float  # enqueue -> admitted into the pipeline
    inference_s: float  # admitted -> last image left
    batch_size: int  # images admitted in the same step


log = logging.getLogger("dyce.service")


class Health:
    """Ready, live and the model's description, as the engine and its remote handles report them."""

    def __init__(self) -> None:
        self._ready = False
        self._fatal: str | None = None  # why it can no longer serve (liveness fails)
        self._info: ModelInfo | None = None
        self.on_fatal: list[Callable[[str], None]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def live(self) -> bool:
        return self._fatal is None

    @property
    def fatal(self) -> str | None:
        return self._fatal

    def check_ready(self) -> None:
        if not self._ready:
            raise NotReady("the model is loading or warming up; poll /v2/health/ready")

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise NotReady("the model is still loading")
        return self._info

    def fail(self, reason: str) -> None:
        """It cannot serve any more: not ready, not live, and whoever runs it is told."""
        if self._fatal is not None:
            return
        self._fatal, self._ready = reason, False
        log.critical("%s; the server can no longer serve", reason)
        for listener in self.on_fatal:
            listener(reason)


class EngineHandle(Protocol):
    settings: Settings

    def check_ready(self) -> None:
        """Raises NotReady unless warmed up and live."""

    @property
    def ready(self) -> bool: ...
    @property
    def live(self) -> bool: ...
    @property
    def fatal(self) -> str | None: ...
    @property
    def info(self) -> ModelInfo:
        """Raises NotReady while the model loads."""

    def admission(
        self, images: int, encoded_bytes: int, lam: float | None, max_relative_macs: float | None
    ) -> AbstractContextManager[Any]:
        """Let a request in or refuse it (4xx/429); held while its images decode."""

    def submit(self, ticket: Any, images: torch.Tensor) -> asyncio.Future[Answer]:
        """Queue the admitted images; cancelling the future drops them from the queue."""

    async def bank_info(self) -> BankInfo: ...
    async def active_info(self) -> ActiveInfo: ...
    async def switch(self, request: SwitchRequest) -> ActiveInfo: ...
    async def set_mode(self, request: ModeRequest) -> ActiveInfo: ...
    async def reload(self, request: ReloadRequest | None) -> ActiveInfo: ...
