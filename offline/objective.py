"""The search objective (paper eq. 10-13) and the exact threshold minimiser.

For a configuration G and one position n, a move "(k_c, t_c) at n" leaves the samples that exit
before n untouched, and every sample reaching n either exits there (its confidence at candidate
k_c is >= t_c: the rule of ``dyce.rule.should_exit``) or carries on to the fate G gives it after
n. With the samples sorted once per candidate by descending confidence, the samples exiting for
a threshold are a prefix of that order, so eq. 13 for every threshold at once is a cumulative
sum, and its exact minimiser over all distinct confidence values is an argmin over the ends of
tie groups (equal confidences exit together). No bounded scalar search: the objective is a step
function and this visits every step.

All sums are exact integers (correct answers; MACs in absolute counts, which are integers), so
the objective of a configuration does not depend on the order it was summed in, and the
greedy searches' strict-improvement tests cannot loop on rounding noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dyce.config import ExitConfiguration
from dyce.macs import MacTable
from dyce.rule import should_exit
from dyce.simulate import ExitRecords


class SearchProblem:
    """Configuration-independent precomputation over one split's records.

    ``rows`` enumerates every candidate (n, k >= 1) of the early positions. Per row the samples
    are sorted by descending confidence once, and ``ends[r, j]`` marks the last sample of a group
    of equal confidences: the only prefixes a threshold can select.
    """

    def __init__(self, records: ExitRecords, macs: MacTable) -> None:
        self.records = records
        self.macs = macs
        self.num_positions = n_pos = records.num_positions
        self.num_samples = m = records.num_samples
        self.num_candidates = tuple(records.num_candidates)
        self.final_correct = records.correct[-1, 0]
        self.final_correct_count = int(self.final_correct.sum())
        if self.final_correct_count == 0:
            raise ValueError("the final head gets no sample right: relative accuracy (eq. 10) is undefined")
        self.total_macs = macs.total_macs
        self.segment_macs = np.asarray(macs.segment_macs, dtype=np.int64)
        self.exit_macs = np.zeros((n_pos, max(self.num_candidates) + 1), dtype=np.int64)
        for n in range(n_pos - 1):
            for k in range(1, self.num_candidates[n] + 1):
                self.exit_macs[n, k] = macs.exit_macs[n][k - 1]
        self.exit_macs[-1, 1] = macs.head_macs
        rows = [(n, k) for n in range(n_pos - 1) for k in range(1, self.num_candidates[n] + 1)]
        self.row_position = np.array([n for n, _ in rows], dtype=np.int64)
        self.row_k = np.array([k for _, k in rows], dtype=np.int64)
        self.row_exit_macs = self.exit_macs[self.row_position, self.row_k]
        conf = np.stack([records.confidence[n, k - 1] for n, k in rows])
        self.order = np.argsort(-conf, axis=1, kind="stable")
        self.sorted_conf = np.take_along_axis(conf, self.order, axis=1)
        correct = np.stack([records.correct[n, k - 1] for n, k in rows])
        self.sorted_correct = np.take_along_axis(correct, self.order, axis=1).astype(np.int8)
        # Exit right minus final head right, per sample: what exiting gains when nothing follows (Alg. 3).
        self.sorted_gain_over_final = self.sorted_correct - self.final_correct[self.order].astype(np.int8)
        self.ends = np.ones(self.sorted_conf.shape, dtype=bool)
        self.ends[:, :-1] = self.sorted_conf[:, :-1] != self.sorted_conf[:, 1:]
        # Flat index into an (N-1, M) per-position array, in each row's sorted order.
        self.flat_order = (self.row_position[:, None] * m + self.order).astype(
            np.int32 if n_pos * m < 2**31 else np.int64
        )
        self.rows_at = [np.flatnonzero(self.row_position == n) for n in range(n_pos - 1)]

    @cached_property
    def sample_rank(self) -> np.ndarray:
        """``sample_rank[m, r]``: where sample m stands in row r's sorted order (``order``
        inverted), sample-major so that one sample's ranks in every row lie together."""
        rank = np.empty(self.order.shape[::-1], dtype=np.int32)
        rank[self.order, np.arange(len(self.order))[:, None]] = np.arange(self.num_samples, dtype=np.int32)[None]
        return rank

    @cached_property
    def sample_row_correct(self) -> np.ndarray:
        """``sample_row_correct[m, r]``: is row r's candidate right on sample m (int8, sample-major)."""
        return np.ascontiguousarray(self.records.correct[self.row_position, self.row_k - 1].T).view(np.int8)

    @cached_property
    def row_start(self) -> np.ndarray:
        """First row of each position (positions 0..N, the last two past the end)."""
        return np.searchsorted(self.row_position, np.arange(self.num_positions + 1))

    def objective(self, lam: float | np.ndarray, correct: np.ndarray | int, macs: np.ndarray | int) -> np.ndarray:
        """Eq. 12 from total correct answers (eq. 10: over M * A_ori = the final head's correct
        count) and total absolute MACs (eq. 11: over M * total MACs of the original model)."""
        accuracy = np.asarray(correct, dtype=np.float64) / self.final_correct_count
        cost = np.asarray(macs, dtype=np.float64) / (self.num_samples * self.total_macs)
        return lam * (1.0 - accuracy) + (1.0 - lam) * cost

    def step_macs(self, exits: np.ndarray) -> np.ndarray:
        """MACs of segment n plus its enabled exit, per position (the final head included)."""
        return self.segment_macs + self.exit_macs[np.arange(self.num_positions), exits]

    def configuration(self, exits: np.ndarray, thresholds: np.ndarray) -> ExitConfiguration:
        ks = [int(k) for k in exits[:-1]] + [1]
        ts = [float(t) if k else 1.0 for k, t in zip(ks[:-1], thresholds[:-1], strict=True)] + [0.0]
        return ExitConfiguration(exits=tuple(ks), thresholds=tuple(ts))

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        exits = np.zeros(self.num_positions, dtype=np.int64)
        exits[-1] = 1
        thresholds = np.ones(self.num_positions)
        thresholds[-1] = 0.0
        return exits, thresholds


@dataclass(frozen=True)
class Move:
    position: int
    k: int  # 0: disable the exit at ``position``
    threshold: float
    value: float


@dataclass(frozen=True)
class MoveTables:
    """Everything eq. 13 needs, for every candidate row and every threshold prefix j of the
    row's sorted order, under one configuration; independent of lambda.

    Moving to (row, prefix j) gives ``off_correct[n] + gain_correct[r, j]`` correct answers and
    ``off_macs[n] + reach_count[n] * exit_macs[r] - saved_macs[r, j]`` MACs in total, where
    ``off_*`` are the totals with position n disabled.
    """

    rows: np.ndarray
    gain_correct: np.ndarray  # int32 (R, M)
    saved_macs: np.ndarray  # int64 (R, M)
    off_correct: np.ndarray  # (N,)
    off_macs: np.ndarray  # (N,)
    reach_count: np.ndarray  # (N,)

    def best_moves(self, problem: SearchProblem, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the prefix minimising eq. 13 (first of equal minima: the highest threshold),
        its threshold and its objective value."""
        positions = problem.row_position[self.rows]
        ends = problem.ends[self.rows]
        # Only the prefix-dependent part of eq. 13 decides the argmin within a row.
        score = (lam / problem.final_correct_count) * self.gain_correct + (
            (1.0 - lam) / (problem.num_samples * problem.total_macs)
        ) * self.saved_macs
        score[~ends] = -np.inf
        best = np.argmax(score, axis=1)
        take = np.arange(len(self.rows))
        correct = self.off_correct[positions] + self.gain_correct[take, best]
        macs = (
            self.off_macs[positions]
            + self.reach_count[positions] * problem.row_exit_macs[self.rows]
            - self.saved_macs[take, best]
        )
        thresholds = problem.sorted_conf[self.rows, best]
        return best, thresholds, problem.objective(lam, correct, macs)


def _totals_before(problem: SearchProblem, exit_at: np.ndarray, correct_at: np.ndarray, exits: np.ndarray):
    """Correct answers and MACs summed over the samples that exit before each position."""
    n_pos = problem.num_positions
    path = np.cumsum(problem.step_macs(exits))
    correct_counts = np.bincount(exit_at, weights=correct_at, minlength=n_pos).astype(np.int64)
    exit_counts = np.bincount(exit_at, minlength=n_pos).astype(np.int64)
    before_correct = np.concatenate([[0], np.cumsum(correct_counts)[:-1]])
    before_macs = np.concatenate([[0], np.cumsum(exit_counts * path)[:-1]])
    return before_correct, before_macs, correct_counts, exit_counts, path


def configuration_totals(problem: SearchProblem, exits: np.ndarray, thresholds: np.ndarray) -> tuple[int, int]:
    """Total correct answers and absolute MACs of a configuration over all samples."""
    exit_here, correct_here = _decisions(problem, exits, thresholds)
    exit_at = np.argmax(exit_here, axis=0)
    correct_at = correct_here[exit_at, np.arange(problem.num_samples)]
    path = np.cumsum(problem.step_macs(exits))
    return int(correct_at.sum()), int(path[exit_at].sum())


def _decisions(problem: SearchProblem, exits: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position and sample: would it leave here if it got here, and would it be right."""
    records = problem.records
    exit_here = np.zeros((problem.num_positions, problem.num_samples), dtype=bool)
    correct_here = np.zeros_like(exit_here)
    for n in np.flatnonzero(exits[:-1]):
        k = int(exits[n])
        # A Python float, as in ExitConfiguration: compared in the records' float32, like the runtime.
        exit_here[n] = should_exit(records.confidence[n, k - 1], float(thresholds[n]))
        correct_here[n] = records.correct[n, k - 1]
    exit_here[-1] = True
    correct_here[-1] = problem.final_correct
    return exit_here, correct_here


def move_tables(problem: SearchProblem, exits: np.ndarray, thresholds: np.ndarray) -> MoveTables:
    """Cumulative sums of eq. 13 for every candidate row under configuration (exits, thresholds)."""
    n_pos, m = problem.num_positions, problem.num_samples
    exit_here, correct_here = _decisions(problem, exits, thresholds)
    step = problem.step_macs(exits)
    # Fate of a sample carrying on past position n, built from the final head backwards.
    carry_correct = np.empty((n_pos - 1, m), dtype=np.int8)
    carry_macs = np.empty((n_pos - 1, m), dtype=np.int64)
    fate_correct = problem.final_correct.astype(np.int8)
    fate_macs = np.full(m, step[-1], dtype=np.int64)
    for n in range(n_pos - 2, -1, -1):
        carry_correct[n], carry_macs[n] = fate_correct, fate_macs
        if exits[n]:
            fate_correct = np.where(exit_here[n], correct_here[n], fate_correct).astype(np.int8)
            fate_macs = step[n] + np.where(exit_here[n], 0, fate_macs)
        else:
            fate_macs = step[n] + fate_macs
    exit_at = np.argmax(exit_here, axis=0)
    reach = np.arange(n_pos - 1)[:, None] <= exit_at[None, :]
    carry_correct *= reach
    carry_macs *= reach
    correct_at = correct_here[exit_at, np.arange(m)]
    before_correct, before_macs, *_ = _totals_before(problem, exit_at, correct_at, exits)
    reach_count = reach.sum(1)
    arrive = np.concatenate([[0], np.cumsum(step)[:-1]])
    off_correct = before_correct[:-1] + carry_correct.sum(1, dtype=np.int64)
    off_macs = before_macs[:-1] + reach_count * (arrive[:-1] + problem.segment_macs[:-1]) + carry_macs.sum(1)

    flat = problem.flat_order
    sorted_reach = np.take(reach.reshape(-1), flat)
    gain = problem.sorted_correct * sorted_reach - np.take(carry_correct.reshape(-1), flat)
    gain_correct = np.cumsum(gain, axis=1, dtype=np.int32)
    saved_macs = np.cumsum(np.take(carry_macs.reshape(-1), flat), axis=1)
    return MoveTables(np.arange(len(flat)), gain_correct, saved_macs, off_correct, off_macs, reach_count)
