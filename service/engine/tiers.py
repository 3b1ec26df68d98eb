"""Tiers: the bank entries the service serves, and the one piece of mutable serving state.

A *tier* is the service's word for one bank entry served at run time: the ``ExitConfiguration``
it runs (exits + thresholds, identified by ``config_id``) together with the bank it came from.

``TierState`` holds an immutable ``ActiveTier`` behind a single reference. A switch builds a
new one and assigns it, so a reader (a request being admitted, the autoswitcher, an admin
call) sees either the old tier or the new one, never a mixture of bank, index and mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from dyce.bank import Bank, BankEntry
from dyce.config import ExitConfiguration

from ..errors import BadRequest, NotFound, Unprocessable

log = logging.getLogger("dyce.service")

Mode = Literal["auto", "manual"]
SwitchReason = Literal["admin", "autoswitch", "request", "reload", "startup"]


@dataclass(frozen=True)
class Tier:
    """One bank entry, remembered with the bank it came from (indices are per bank)."""

    bank: Bank
    index: int

    @property
    def entry(self) -> BankEntry:
        return self.bank.entries[self.index]

    @property
    def config(self) -> ExitConfiguration:
        return self.entry.config

    @property
    def lam(self) -> float:
        return self.entry.lam

    @property
    def config_id(self) -> str:
        return self.entry.config_id

    @property
    def expected_relative_macs(self) -> float:
        return self.entry.search.relative_macs

    @property
    def expected_relative_cost(self) -> float:
        """What the bank's search traded against: measured time for a latency bank, else MACs."""
        return self.entry.search.relative_cost

    @property
    def expected_accuracy(self) -> float:
        return self.entry.search.accuracy

    def frontier(self) -> list[Tier]:
        """The bank's non-dominated tiers, most accurate first."""
        return [Tier(self.bank, i) for i in reversed(self.bank.frontier())]


@dataclass(frozen=True)
class ActiveTier:
    tier: Tier
    mode: Mode
    reason: SwitchReason
    since_monotonic: float
    since_unix: float


TierListener = Callable[[ActiveTier], None]


class TierState:
    def __init__(self, bank: Bank, mode: Mode, listeners: list[TierListener] | None = None) -> None:
        self._listeners = list(listeners or [])
        self._lock = threading.Lock()  # serialises writers; readers just read the reference
        self._active = self._stamp(Tier(bank, bank.most_accurate()), mode, "startup")
        self._notify(self._active)

    @staticmethod
    def _stamp(tier: Tier, mode: Mode, reason: SwitchReason) -> ActiveTier:
        return ActiveTier(tier, mode, reason, time.monotonic(), time.time())

    def _notify(self, active: ActiveTier) -> None:
        for listener in self._listeners:
            listener(active)

    @property
    def active(self) -> ActiveTier:
        return self._active

    @property
    def bank(self) -> Bank:
        return self._active.tier.bank

    def switch(self, index: int, reason: SwitchReason, mode: Mode | None = None) -> ActiveTier:
        with self._lock:
            current = self._active
            if not 0 <= index < len(current.tier.bank.entries):
                raise NotFound(f"bank has no entry {index} (it has {len(current.tier.bank.entries)})")
            changed = index != current.tier.index
            if changed:
                self._active = self._stamp(Tier(current.tier.bank, index), mode or current.mode, reason)
            elif mode is not None and mode != current.mode:
                self._active = replace(current, mode=mode)
            active = self._active
        if changed:
            log.info(
                "tier switch (%s): bank index %d -> %d, lambda %.4g", reason, current.tier.index, index, active.tier.lam
            )
            self._notify(active)
        return active

    def set_mode(self, mode: Mode) -> ActiveTier:
        with self._lock:
            self._active = replace(self._active, mode=mode)
            return self._active

    def replace_bank(self, bank: Bank) -> ActiveTier:
        """Serve a new bank, at the entry whose lambda is nearest the one that was active."""
        with self._lock:
            previous = self._active
            tier = Tier(bank, bank.nearest_lambda(previous.tier.lam))
            self._active = self._stamp(tier, previous.mode, "reload")
            active = self._active
        log.info("bank reloaded: %d entries, now at index %d (lambda %.4g)", len(bank.entries), tier.index, tier.lam)
        self._notify(active)
        return active

    def resolve(self, lam: float | None, max_relative_macs: float | None) -> Tier | None:
        """A client's own tier: the entry nearest a lambda, or the most accurate within a MAC budget."""
        check_tier_choice(lam, max_relative_macs)
        bank = self.bank
        if lam is not None:
            return Tier(bank, bank.nearest_lambda(lam))
        if max_relative_macs is not None:
            index = bank.within_macs(max_relative_macs)
            if index is None:
                cheapest = min(e.search.relative_macs for e in bank.entries)
                raise Unprocessable(
                    f"no configuration fits {max_relative_macs} relative MACs; the cheapest needs {cheapest:.4f}"
                )
            return Tier(bank, index)
        return None


def check_tier_choice(lam: float | None, max_relative_macs: float | None) -> None:
    """A request chooses its tier one way at most; checked before any bank is consulted."""
    if lam is not None and max_relative_macs is not None:
        raise BadRequest("ask for a tier by lambda or by max_relative_macs, not both")
