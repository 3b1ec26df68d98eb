"""Multiply-accumulate counts (paper Sec. V-A-2), measured with torch's own FLOP counter.

MACs = FLOPs / 2, counting what ``FlopCounterMode`` counts (convolutions and matrix
products), the same convention as torchvision's published ``_ops`` figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbones import SegmentedModel
from .config import ExitConfiguration
from .exits import ExitSet


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


class MacTable(BaseModel):
    """Absolute MACs per image of every segment, the final head and every candidate exit."""

    model_config = ConfigDict(frozen=True)

    segment_macs: tuple[int, ...]
    head_macs: int
    exit_macs: tuple[tuple[int, ...], ...] = Field(description="[position][k-1] MACs of candidate k")

    @property
    def total_macs(self) -> int:
        return sum(self.segment_macs) + self.head_macs

    @property
    def num_positions(self) -> int:
        return len(self.segment_macs)

    def relative_segments(self) -> np.ndarray:
        """S_n, with the head folded into nothing: sum(S_n) + head share = 1."""
        return np.asarray(self.segment_macs, dtype=np.float64) / self.total_macs

    def relative_exit(self, position: int, index: int) -> float:
        """Delta_{n,k} (0 for k = 0); at the last position the only exit is the head."""
        if index == 0:
            return 0.0
        if position == self.num_positions - 1:
            return self.head_macs / self.total_macs
        return self.exit_macs[position][index - 1] / self.total_macs

    def path_costs(self, config: ExitConfiguration) -> np.ndarray:
        """Relative MACs spent by a sample that exits at each position under ``config``:
        every segment it ran plus every enabled exit it passed, including its own (eq. 11)."""
        per_position = self.relative_segments() + np.array(
            [self.relative_exit(n, k) for n, k in enumerate(config.exits)]
        )
        return np.cumsum(per_position)


@torch.no_grad()
def measure_macs(backbone: SegmentedModel, exits: ExitSet | None = None, batch: int = 1) -> MacTable:
    """Count MACs per image by running one dummy input through every part in order."""
    was_training = backbone.training
    backbone.eval()
    param = next(backbone.parameters())
    x = torch.zeros(batch, *backbone.input_spec.shape, device=param.device, dtype=param.dtype)
    segment_macs, exit_macs = [], []
    for n, segment in enumerate(backbone.segments):
        segment_macs.append(count_macs(segment, x) // batch)
        x = segment(x)
        candidates: Sequence[nn.Module] = exits.candidates[n] if exits is not None else ()
        exit_macs.append(tuple(count_macs(c.eval(), x) // batch for c in candidates))
    head_macs = count_macs(backbone.head, x) // batch
    backbone.train(was_training)
    return MacTable(segment_macs=tuple(segment_macs), head_macs=head_macs, exit_macs=tuple(exit_macs))
