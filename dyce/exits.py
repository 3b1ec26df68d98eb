"""Exit networks (paper Sec. IV-A) and the set of candidate exits attached to a backbone.

An exit maps the output of segment ``n`` to logits in the final head's format. The paper's
five candidate types all start with global average pooling, then an MLP. Any ``nn.Module``
with the same contract (segment output -> logits of ``num_classes``) is accepted as well,
registered under a kind name so it can be rebuilt from saved weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ExitBuilder = Callable[[int, int], nn.Module]  # (in_channels, num_classes) -> exit module


class PooledMLPExit(nn.Module):
    """Global average pooling, then an MLP of ``depth`` linear layers of ``width`` hidden units.

    ``pool`` and ``mlp`` are separate so training can cache pooled features once per position
    and fit only the MLP (the backbone is frozen, so pooled features never change).
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int, width: int) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        layers: list[nn.Module] = []
        features = in_channels
        for _ in range(depth - 1):
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(x) if x.dim() == 4 else x)


def _pooled_mlp(depth: int, width: int) -> ExitBuilder:
    return lambda in_channels, num_classes: PooledMLPExit(in_channels, num_classes, depth, width)


_EXIT_KINDS: dict[str, ExitBuilder] = {
    "mlp1": _pooled_mlp(1, 0),
    "mlp3x500": _pooled_mlp(3, 500),
    "mlp3x1000": _pooled_mlp(3, 1000),
    "mlp5x500": _pooled_mlp(5, 500),
    "mlp5x1000": _pooled_mlp(5, 1000),
}
PAPER_EXIT_KINDS: tuple[str, ...] = tuple(_EXIT_KINDS)


def register_exit_kind(kind: str, builder: ExitBuilder) -> None:
    """Make a user exit architecture buildable by name (so saved exit sets can be reloaded)."""
    if kind in _EXIT_KINDS:
        raise ValueError(f"exit kind {kind!r} is already registered")
    _EXIT_KINDS[kind] = builder


def build_exit(kind: str, in_channels: int, num_classes: int) -> nn.Module:
    try:
        builder = _EXIT_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown exit kind {kind!r}; known: {', '.join(sorted(_EXIT_KINDS))}") from None
    return builder(in_channels, num_classes)


@dataclass(frozen=True)
class ExitSpec:
    """Identity of one candidate exit: at ``position`` it is option ``index`` (1-based, the
    paper's k; 0 means 'no exit')."""

    position: int
    index: int
    kind: str
    in_channels: int
    num_classes: int


class ExitSet(nn.Module):
    """All candidate exits of a backbone: ``candidates[n]`` lists the options at position ``n``.

    The last position has no candidates here: its only exit is the backbone's own head.
    """

    def __init__(self, num_positions: int, specs: Sequence[ExitSpec], modules: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(specs) != len(modules):
            raise ValueError("one module per exit spec is required")
        self.num_positions = num_positions
        self.specs: list[list[ExitSpec]] = [[] for _ in range(num_positions)]
        self.candidates = nn.ModuleList(nn.ModuleList() for _ in range(num_positions))
        for spec, module in sorted(zip(specs, modules, strict=True), key=lambda sm: (sm[0].position, sm[0].index)):
            if not 0 <= spec.position < num_positions - 1:
                raise ValueError(f"exit position {spec.position} outside 0..{num_positions - 2}")
            if spec.index != len(self.specs[spec.position]) + 1:
                raise ValueError(f"exit indices at position {spec.position} must be 1, 2, ... in order")
            self.specs[spec.position].append(spec)
            self.candidates[spec.position].append(module)

    @classmethod
    def build(
        cls,
        position_channels: Sequence[int],
        num_classes: int,
        kinds: Sequence[str],
        positions: Sequence[int] | None = None,
    ) -> ExitSet:
        """Fresh candidates of every ``kind`` at every early position (or just ``positions``)."""
        num_positions = len(position_channels)
        positions = range(num_positions - 1) if positions is None else positions
        specs = [
            ExitSpec(n, k + 1, kind, position_channels[n], num_classes)
            for n in positions
            for k, kind in enumerate(kinds)
        ]
        modules = [build_exit(s.kind, s.in_channels, s.num_classes) for s in specs]
        return cls(num_positions, specs, modules)

    @property
    def num_candidates(self) -> list[int]:
        """K_n per position; the last position counts its single final head."""
        return [len(specs) for specs in self.specs[:-1]] + [1]

    def all_specs(self) -> list[ExitSpec]:
        return [spec for specs in self.specs for spec in specs]

    def exit(self, position: int, index: int) -> nn.Module:
        return self.candidates[position][index - 1]
