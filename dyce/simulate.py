"""Offline simulation of a configuration over recorded exit outputs (paper eq. 4-11).

Given, for every sample of a dataset, the confidence and correctness of every candidate exit
(and of the final head), it computes which exit each sample would leave at, E_n, the relative
accuracy A (eq. 10) and the relative MACs C (eq. 11), with the same exit rule as the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ExitConfiguration
from .macs import MacTable
from .rule import should_exit


@dataclass(frozen=True)
class ExitRecords:
    """Per-sample outputs of every candidate exit on one dataset split.

    ``confidence[n, k-1, m]``: max softmax of candidate k at position n for sample m;
    ``correct`` likewise; the final head is candidate 1 of the last position. Positions with
    fewer than ``max K`` candidates are padded (confidence NaN, never used).
    """

    confidence: np.ndarray  # float32 (N, K, M)
    correct: np.ndarray  # bool (N, K, M)
    num_candidates: tuple[int, ...]  # K_n, last = 1

    @property
    def num_positions(self) -> int:
        return self.confidence.shape[0]

    @property
    def num_samples(self) -> int:
        return self.confidence.shape[2]

    @property
    def original_accuracy(self) -> float:
        """A_ori: the final head's accuracy (the plain backbone)."""
        return float(self.correct[-1, 0].mean())


@dataclass(frozen=True)
class SimulationResult:
    exit_positions: np.ndarray  # (M,) position each sample leaves at
    exit_counts: np.ndarray  # E_n (N,)
    correct_counts: np.ndarray  # EC_n (N,)
    accuracy: float  # raw accuracy of the configuration
    relative_accuracy: float  # A (eq. 10): accuracy / A_ori
    relative_macs: float  # C (eq. 11)

    @property
    def exit_rates(self) -> np.ndarray:
        return self.exit_counts / self.exit_counts.sum()


def exit_positions(records: ExitRecords, config: ExitConfiguration) -> np.ndarray:
    """Position at which every sample leaves (U_n of eq. 5 as labels)."""
    if config.num_positions != records.num_positions:
        raise ValueError(f"configuration has {config.num_positions} positions, records {records.num_positions}")
    config.check_candidates(records.num_candidates)
    last = records.num_positions - 1
    positions = np.full(records.num_samples, last, dtype=np.int64)
    running = np.ones(records.num_samples, dtype=bool)
    for n, (k, t) in enumerate(zip(config.exits[:-1], config.thresholds[:-1], strict=True)):
        if k == 0:
            continue
        leaving = running & should_exit(records.confidence[n, k - 1], t)
        positions[leaving] = n
        running &= ~leaving
    return positions


def simulate(records: ExitRecords, config: ExitConfiguration, macs: MacTable) -> SimulationResult:
    positions = exit_positions(records, config)
    chosen = np.array([max(k, 1) for k in config.exits]) - 1  # k=0 positions are never selected
    correct = records.correct[positions, chosen[positions], np.arange(records.num_samples)]
    n = records.num_positions
    exit_counts = np.bincount(positions, minlength=n)
    correct_counts = np.bincount(positions, weights=correct, minlength=n).astype(np.int64)
    accuracy = float(correct.mean())
    rel_macs = float(exit_counts @ macs.path_costs(config) / records.num_samples)
    return SimulationResult(
        exit_positions=positions,
        exit_counts=exit_counts,
        correct_counts=correct_counts,
        accuracy=accuracy,
        relative_accuracy=accuracy / records.original_accuracy,
        relative_macs=rel_macs,
    )
