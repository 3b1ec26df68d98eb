"""Admission: a request is let in, or refused with 429, before any of its images is decoded
(in one process; across processes, when its decoded images reach the engine: ``engine.remote``).

Every request is admitted the same way, whichever tier it runs under and whatever the mode:

- its images must finish within the latency objective at the cost of the tier they will run
  under (the active one, a pinned one, or the one the request asked for), behind the images
  already waiting;
- the queue's room in requests, images and bytes (encoded + decoded) must hold it, and is held
  for it while it decodes (``DynamicBatcher.reserve``); the room is given back when the request
  leaves, or handed to the queue when its images are submitted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..engine.batcher import DynamicBatcher, Reservation
from ..engine.tiers import Tier, TierState
from ..errors import BadRequest, QueueFull
from ..settings import Settings
from .costs import CostModel


def check_image_count(images: int, max_batch_size: int) -> None:
    """One request holds at least one image and at most one batch."""
    if images < 1:
        raise BadRequest("no image in the request")
    if images > max_batch_size:
        raise BadRequest(f"{images} images in one request; at most {max_batch_size}")


@dataclass(frozen=True)
class Admission:
    """A request let in: the tier it will run under and the queue room held for its images."""

    tier: Tier
    requested: bool  # the client chose the tier
    overrides_active: bool
    reservation: Reservation


class AdmissionControl:
    def __init__(
        self,
        settings: Settings,
        state: TierState,
        costs: CostModel,
        batcher: DynamicBatcher,
        decoded_image_bytes: int,
        arrived: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.state = state
        self.costs = costs
        self.batcher = batcher
        self.decoded_image_bytes = decoded_image_bytes
        self.arrived = arrived  # the autoswitcher's arrival count: refused requests are load too
        self.slo_s = settings.slo_p95_ms / 1e3

    def within_slo(self, images: int, tier: Tier) -> None:
        """Refuse work that could not finish within the SLO at the cost of its tier."""
        capacity = self.costs.capacity(tier.config, self.settings.max_batch_size)
        finish_s = (self.batcher.queued_images + images) / capacity
        if finish_s > self.slo_s:
            raise QueueFull(
                f"overloaded: this request would finish in about {finish_s * 1e3:.0f} ms, past the "
                f"{self.settings.slo_p95_ms:g} ms latency objective; retry shortly",
                headers={"Retry-After": "1"},
            )

    @contextlib.contextmanager
    def admit(
        self, images: int, encoded_bytes: int, lam: float | None = None, max_relative_macs: float | None = None
    ) -> Iterator[Admission]:
        check_image_count(images, self.settings.max_batch_size)
        requested = self.state.resolve(lam, max_relative_macs)
        active = self.state.active.tier
        tier: Tier = requested or active
        self.arrived(images)
        self.within_slo(images, tier)
        reservation = self.batcher.reserve(images, encoded_bytes + images * self.decoded_image_bytes)
        try:
            yield Admission(tier, requested is not None, tier.config != active.config, reservation)
        finally:
            self.batcher.release(reservation)
