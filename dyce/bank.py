"""The configuration bank: one searched configuration per lambda, with its expected accuracy
and MACs, tied to the exact backbone and exit weights it was searched for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import ExitConfiguration
from .macs import MacTable
from .profile import Where
from .savers import SAVER_POSITION, position_offset

SCHEMA_VERSION = 1


class BankMismatchError(ValueError):
    """The bank was searched for other backbone or exit weights than the ones loaded."""


class BackboneIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    weights_sha256: str


class ExitIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    position: int
    index: int
    kind: str
    sha256: str


def run_time_candidates(
    exits: Sequence[ExitIdentity], savers: Sequence[ExitIdentity] = ()
) -> dict[tuple[int, int], ExitIdentity]:
    """Exits (numbered by backbone position) and savers by their (position, k) in the model that
    runs them: with savers, the saver stage is position 0 and every exit moves one on."""
    offset = position_offset(bool(savers))
    candidates = {(e.position + offset, e.index): e for e in exits}
    candidates |= {(SAVER_POSITION, s.index): s for s in savers}
    return candidates


class SplitMetrics(BaseModel):
    """Simulated figures of a configuration on one data split."""

    model_config = ConfigDict(frozen=True)

    accuracy: float = Field(ge=0, le=1)
    relative_accuracy: float = Field(ge=0, description="A of eq. 10: accuracy / original accuracy")
    relative_macs: float = Field(ge=0, description="C of eq. 11")
    exit_rates: tuple[float, ...]
    relative_latency: float | None = Field(
        None, ge=0, description="C of eq. 11 on measured time instead of MACs (banks searched with --cost latency)"
    )

    @property
    def relative_cost(self) -> float:
        """What the search traded accuracy against: measured time when it was costed on it."""
        return self.relative_latency if self.relative_latency is not None else self.relative_macs


class CostBasis(BaseModel):
    """What a bank's search traded accuracy against: MACs (the paper), or time measured on one
    device and backend (``dyce-offline profile``), which is only exact where it was measured."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["macs", "latency"] = "macs"
    where: Where | None = None
    batch: int | None = Field(None, description="the batch bucket whose per-image times were used")
    profile_sha256: str | None = None
    table: MacTable | None = Field(None, description="ns per image of every part, as the search used them")


class BankEntry(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    lam: float = Field(alias="lambda", ge=0, le=1)
    algorithm: str
    config: ExitConfiguration
    search: SplitMetrics
    test: SplitMetrics | None = None
    dominated: bool = Field(False, description="another entry is at least as accurate and cheaper (on search)")

    @property
    def config_id(self) -> str:
        return self.config.config_id


class Bank(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    backbone: BackboneIdentity
    exits: tuple[ExitIdentity, ...]
    num_candidates: tuple[int, ...]
    macs: MacTable
    original_accuracy: dict[str, float] = Field(description="plain backbone accuracy per split")
    entries: tuple[BankEntry, ...] = Field(min_length=1)
    cost: CostBasis = CostBasis()
    savers: tuple[ExitIdentity, ...] = Field(
        (),
        description="candidate savers (TinySaver): with any, position 0 is the saver stage in front of the "
        "backbone, backbone position n is position n + 1 of num_candidates, macs and every configuration",
    )

    @property
    def saver_stage(self) -> bool:
        return bool(self.savers)

    def candidates(self) -> dict[tuple[int, int], ExitIdentity]:
        """Every candidate this bank names, by its (position, k) in the configurations."""
        return run_time_candidates(self.exits, self.savers)

    @model_validator(mode="after")
    def _consistent(self) -> Bank:
        if self.macs.num_positions != len(self.num_candidates):
            raise ValueError("MAC table and num_candidates disagree on the number of positions")
        if any(s.position != SAVER_POSITION for s in self.savers):
            raise ValueError("savers sit at position 0")
        declared = self.candidates()
        for i, entry in enumerate(self.entries):
            try:
                entry.config.check_candidates(self.num_candidates)
            except ValueError as err:
                raise ValueError(f"entry {i}: {err}") from None
            for n, k in enumerate(entry.config.exits[:-1]):
                if k and (n, k) not in declared:
                    raise ValueError(f"entry {i} uses exit ({n}, {k}) which the bank does not identify")
        return self

    @property
    def num_positions(self) -> int:
        return len(self.num_candidates)

    def used_exits(self) -> set[tuple[int, int]]:
        """(position, k) of every early exit some configuration enables, savers included, in the
        configurations' positions (shifted by the saver stage)."""
        return {(n, k) for entry in self.entries for n, k in enumerate(entry.config.exits[:-1]) if k}

    @classmethod
    def load(cls, path: str | Path) -> Bank:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(by_alias=True, indent=1))

    def check_matches(
        self,
        backbone: BackboneIdentity,
        exits: list[ExitIdentity] | tuple[ExitIdentity, ...],
        savers: list[ExitIdentity] | tuple[ExitIdentity, ...] = (),
    ) -> None:
        if backbone != self.backbone:
            raise BankMismatchError(
                f"bank was searched for backbone {self.backbone.name} (weights {self.backbone.weights_sha256[:12]}), "
                f"loaded is {backbone.name} (weights {backbone.weights_sha256[:12]})"
            )
        loaded = {(e.position, e.index): e for e in exits}
        for needed in self.exits:
            have = loaded.get((needed.position, needed.index))
            if have != needed:
                got = "missing" if have is None else f"{have.kind} {have.sha256[:12]}"
                raise BankMismatchError(
                    f"bank needs exit {needed.kind} at position {needed.position} (k={needed.index}, "
                    f"weights {needed.sha256[:12]}), loaded: {got}"
                )
        loaded_savers = {s.index: s for s in savers}
        for needed in self.savers:
            have = loaded_savers.get(needed.index)
            if have != needed:
                got = "missing" if have is None else f"{have.kind} {have.sha256[:12]}"
                raise BankMismatchError(
                    f"bank needs saver {needed.kind} (k={needed.index}, weights {needed.sha256[:12]}), loaded: {got}"
                )

    # Selection, shared by admin switches, per-request tiers and the autoswitcher.
    def frontier(self) -> list[int]:
        """Indices of non-dominated entries, cheapest first."""
        return sorted(
            (i for i, e in enumerate(self.entries) if not e.dominated),
            key=lambda i: self.entries[i].search.relative_cost,
        )

    def most_accurate(self) -> int:
        return max(
            range(len(self.entries)),
            key=lambda i: (self.entries[i].search.accuracy, -self.entries[i].search.relative_cost),
        )

    def nearest_lambda(self, lam: float) -> int:
        return min(
            range(len(self.entries)), key=lambda i: (abs(self.entries[i].lam - lam), -self.entries[i].search.accuracy)
        )

    def within_macs(self, max_relative_macs: float) -> int | None:
        """Most accurate entry whose expected MACs fit the budget (None if none does)."""
        fitting = [i for i, e in enumerate(self.entries) if e.search.relative_macs <= max_relative_macs]
        return max(
            fitting,
            key=lambda i: (self.entries[i].search.accuracy, -self.entries[i].search.relative_macs),
            default=None,
        )

    def reaching_accuracy(self, min_accuracy: float) -> int | None:
        """Cheapest entry whose expected accuracy is at least ``min_accuracy`` (None if none)."""
        reaching = [i for i, e in enumerate(self.entries) if e.search.accuracy >= min_accuracy]
        return min(
            reaching,
            key=lambda i: (self.entries[i].search.relative_macs, -self.entries[i].search.accuracy),
            default=None,
        )
