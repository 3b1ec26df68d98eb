from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """What one input image looks like to the backbone (channels, height, width)."""

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class SegmentedModel(nn.Module):
    """A torchvision classifier viewed as ``N`` ordered segments plus its final head.

    The segments and the head are the *same* module objects as in the wrapped model (no copy),
    so loading weights into either changes both and ``head(segments(x)) == model(x)``.
    Position ``n`` (0-based) is the output of segment ``n``; the final head is the exit at
    position ``N-1`` (paper: ``k_N = 1``, ``t_N = 0``).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        segments: list[nn.Module],
        head: nn.Module,
        input_spec: InputSpec,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.segments = nn.ModuleList(segments)
        self.head = head
        self.input_spec = input_spec
        self.num_classes = num_classes

    @property
    def num_positions(self) -> int:
        return len(self.segments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for segment in self.segments:
            x = segment(x)
        return self.head(x)

    @torch.no_grad()
    def position_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of every segment output, found by one dummy forward pass."""
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        x = torch.zeros(1, *self.input_spec.shape, device=param.device, dtype=param.dtype)
        shapes = []
        for segment in self.segments:
            x = segment(x)
            shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes
