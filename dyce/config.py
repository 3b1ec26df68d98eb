"""Exit configurations G = {k, t} (paper Sec. III-A-4)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ExitConfiguration(BaseModel):
    """Which exit is enabled after each segment (``exits[n]``: 0 = none, k = candidate k) and
    its confidence threshold. Positions are 0-based; the last one is the backbone's own head
    and is always ``k = 1, t = 0`` so every sample leaves eventually.

    Immutable and hashable, so the executor can swap configurations atomically and a batch
    in flight keeps the one it started with. The threshold of a disabled exit is meaningless
    and is stored as 1.0, so equal behaviour means equal value (and equal ``config_id``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    exits: tuple[int, ...] = Field(min_length=1)
    thresholds: tuple[float, ...] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data: Any) -> Any:
        if isinstance(data, dict) and "exits" in data and "thresholds" in data:
            exits, thresholds = list(data["exits"]), list(data["thresholds"])
            if len(exits) == len(thresholds):
                data = {**data, "thresholds": [1.0 if k == 0 else t for k, t in zip(exits, thresholds, strict=True)]}
        return data

    @model_validator(mode="after")
    def _check(self) -> ExitConfiguration:
        if len(self.exits) != len(self.thresholds):
            raise ValueError(f"{len(self.exits)} exits but {len(self.thresholds)} thresholds")
        if any(k < 0 for k in self.exits):
            raise ValueError("exit indices must be >= 0")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError("thresholds must lie in [0, 1]")
        if self.exits[-1] != 1 or self.thresholds[-1] != 0.0:
            raise ValueError("the last position must be the final head: exit 1, threshold 0")
        return self

    @classmethod
    def final_only(cls, num_positions: int) -> ExitConfiguration:
        """The original model: no early exit."""
        return cls(exits=(0,) * (num_positions - 1) + (1,), thresholds=(1.0,) * (num_positions - 1) + (0.0,))

    @property
    def num_positions(self) -> int:
        return len(self.exits)

    @property
    def config_id(self) -> str:
        return _config_id(self)

    def check_candidates(self, num_candidates: Sequence[int]) -> None:
        """Raise if this configuration names an exit that the exit set does not have."""
        if len(num_candidates) != self.num_positions:
            raise ValueError(f"configuration has {self.num_positions} positions, the model {len(num_candidates)}")
        for n, (k, available) in enumerate(zip(self.exits, num_candidates, strict=True)):
            if k > available:
                raise ValueError(f"position {n}: exit {k} requested but only {available} candidates exist")


@functools.lru_cache(maxsize=4096)
def _config_id(config: ExitConfiguration) -> str:
    # Every answer carries its configuration's id: hashing its JSON each time cost ~20 us a request.
    # A threshold of -0.0 equals 0.0 but prints otherwise: equal configurations get one id.
    canonical = config.model_copy(update={"thresholds": tuple(t + 0.0 for t in config.thresholds)})
    return hashlib.sha256(canonical.model_dump_json().encode()).hexdigest()[:12]
