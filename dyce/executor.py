"""Run-time early-exit executor (paper Alg. 1), batched, where computation really stops.

After segment n only the samples still running go through the configured exit; the ones whose
confidence passes the threshold leave with their probabilities, the rest are compacted with
``index_select`` and continue, so later segments see smaller batches, and none at all once
every sample has left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .backbones import SegmentedModel
from .config import ExitConfiguration
from .execution_backends import ExecutionBackend, TorchBackend
from .exits import ExitSet
from .macs import MacTable
from .rule import confidence_and_prediction, probabilities, should_exit


@dataclass(frozen=True)
class ExecutionResult:
    probabilities: torch.Tensor  # (B, num_classes), float32, on CPU
    exit_positions: torch.Tensor  # (B,) int64, on CPU
    relative_macs: np.ndarray  # (B,) MACs each sample used, relative to the plain model
    config: ExitConfiguration  # the one configuration the whole batch ran under


class EarlyExitExecutor:
    def __init__(
        self,
        backbone: SegmentedModel,
        exits: ExitSet,
        macs: MacTable,
        config: ExitConfiguration | None = None,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        backend: ExecutionBackend | None = None,
    ) -> None:
        if exits.num_positions != backbone.num_positions or macs.num_positions != backbone.num_positions:
            raise ValueError("backbone, exits and MAC table disagree on the number of positions")
        self.backend = backend or TorchBackend(backbone, exits, torch.device(device), channels_last)
        self.device = self.backend.device
        self.backbone = backbone
        self.exits = exits
        self.macs = macs
        self._path_costs: dict[ExitConfiguration, np.ndarray] = {}
        self._config = self.checked(config or ExitConfiguration.final_only(backbone.num_positions))

    @property
    def num_positions(self) -> int:
        return self.backbone.num_positions

    @property
    def config(self) -> ExitConfiguration:
        return self._config

    def set_config(self, config: ExitConfiguration) -> None:
        """Atomic: a single reference assignment of an immutable, pre-validated object."""
        self._config = self.checked(config)

    def checked(self, config: ExitConfiguration) -> ExitConfiguration:
        """``config`` once validated against the exit set (its path costs are then cached)."""
        config.check_candidates(self.exits.num_candidates)
        if config not in self._path_costs:
            self._path_costs[config] = self.macs.path_costs(config)
        return config

    def path_costs(self, config: ExitConfiguration) -> np.ndarray:
        """Relative MACs of a sample leaving at each position under a ``checked`` configuration."""
        return self._path_costs[config]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend.prepare(images)

    @torch.inference_mode()
    def run(self, images: torch.Tensor, config: ExitConfiguration | None = None) -> ExecutionResult:
        """Classify a batch. ``config`` overrides the active configuration for this batch only."""
        config = self.checked(config) if config is not None else self._config
        x = self.prepare(images)
        batch = x.shape[0]
        out = torch.empty(batch, self.backbone.num_classes, device=self.device)
        exit_at = torch.full((batch,), self.num_positions - 1, dtype=torch.int64, device=self.device)
        alive = torch.arange(batch, device=self.device)  # original row of every running sample
        last = self.num_positions - 1
        for n in range(self.num_positions):
            x = self.backend.segment(n, x)
            if n == last:
                out[alive] = probabilities(self.backend.head_logits(x))
                break
            k = config.exits[n]
            if k == 0:
                continue
            probs = probabilities(self.backend.exit_logits(n, k, x))
            confidence, _ = confidence_and_prediction(probs)
            leaving = should_exit(confidence, config.thresholds[n])
            num_leaving = int(leaving.sum())
            if num_leaving == 0:
                continue
            out[alive[leaving]] = probs[leaving]
            exit_at[alive[leaving]] = n
            if num_leaving == x.shape[0]:
                break  # nobody left: the remaining segments never run
            staying = torch.nonzero(~leaving).squeeze(1)
            x = x.index_select(0, staying)
            alive = alive.index_select(0, staying)
        exit_at_cpu = exit_at.cpu()
        return ExecutionResult(
            probabilities=out.cpu(),
            exit_positions=exit_at_cpu,
            relative_macs=self.path_costs(config)[exit_at_cpu.numpy()],
            config=config,
        )
