"""Alg. 2's rounds for one lambda, fast: every row's best move found exactly, but only for the
rows that could still win the round.

Each round needs, for every candidate row (n, k), the exact best threshold under the current
configuration: a pass over the row's M samples in its fixed confidence order (cumulative sums,
argmax over tie-group ends, as ``objective.move_tables`` does it for all rows at once). A move
at one position changes every other row a little, through the few samples whose fate it
changes. So each row keeps, from its last exact pass, the best score inside each block of
``BLOCK`` prefixes, and every move raises a per-block upper bound by what its changed samples
can add there (their positive parts inside the block, plus everything entering it). A row is
passed over again only when its bound says it could beat the best move known this round;
``BOUND_MARGIN`` covers float rounding, so the chosen move is the one an exhaustive round picks.

The passes and bound updates are numba loops: one fused pass per row, with no (rows, M)
temporaries, is what makes thousands of rounds affordable (the paper-scale bench runs ~80
rounds for each of 101 lambdas).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dyce.rule import should_exit

from .objective import SearchProblem

BLOCK = 256
# Objective units: far above the rounding between a bound and an exact value (~1e-15), far
# below any real difference between moves (one sample moves eq. 12 by about 1 / M).
BOUND_MARGIN = 1e-9


@njit(cache=True)
def _best_prefixes(rows, order, sorted_correct, ends, reach, carry_correct, carry_macs, a, b, out_prefix, out_gain,
                   out_saved, out_score, block_max):  # fmt: skip
    """Per row: first argmax over tie-group ends of a * gain + b * saved (exact integer sums,
    scored as ``MoveTables.best_moves`` scores them), and the best score of every block."""
    m = order.shape[1]
    for r in rows:
        gain = 0
        saved = 0
        top, top_prefix, top_gain, top_saved = -np.inf, 0, 0, 0
        block_top = -np.inf
        for i in range(m):
            sample = order[r, i]
            if reach[sample]:
                gain += sorted_correct[r, i] - carry_correct[sample]
                saved += carry_macs[sample]
            if ends[r, i]:
                score = a * gain + b * saved
                if score > top:
                    top, top_prefix, top_gain, top_saved = score, i, gain, saved
                block_top = max(block_top, score)
            if (i + 1) % BLOCK == 0 or i == m - 1:
                block_max[r, i // BLOCK] = block_top
                block_top = -np.inf
        out_prefix[r], out_gain[r], out_saved[r], out_score[r] = top_prefix, top_gain, top_saved, top


@njit(cache=True)
def _carry(position, exit_at, second, correct_here, path, reach, carry_correct, carry_macs):
    """Per sample, for the rows at ``position``: does it get there, and the correctness and the
    MACs after ``position`` of where it leaves if it carries on past it."""
    for sample in range(exit_at.shape[0]):
        reach[sample] = exit_at[sample] >= position
        fate = exit_at[sample] if exit_at[sample] > position else second[sample]
        carry_correct[sample] = correct_here[fate, sample] if reach[sample] else 0
        carry_macs[sample] = path[fate] - path[position] if reach[sample] else 0


@njit(cache=True)
def _add_change(rank, row, sample, change, rises, totals):
    block = rank[sample, row] // BLOCK
    totals[row, block] += change
    rises[row, block] += max(change, 0.0)


@njit(cache=True)
def _reach_changes(sign, samples, exit_at, second, position, row_start, row_position, rank, row_correct, correct_here,
                   path, a, b, rises, totals):  # fmt: skip
    """Rows after ``position`` that ``samples`` (leaving at ``exit_at``, else at ``second``)
    stop reaching (sign -1) or now reach (sign +1): minus or plus their score there."""
    for z in range(samples.shape[0]):
        sample, leave = samples[z], exit_at[z]
        for row in range(row_start[position + 1], row_start[leave + 1]):
            n = row_position[row]
            fate = leave if leave > n else second[z]
            exit_gain = row_correct[sample, row] - correct_here[fate, sample]
            _add_change(rank, row, sample, sign * (a * exit_gain + b * (path[fate] - path[n])), rises, totals)


@njit(cache=True)
def _raise_bounds(position, rank, row_start, row_position, row_correct, correct_here, path, a, b,
                  before, before_rise, before_exit, before_through, before_uniform,
                  lost, lost_exit, lost_second, gained, gained_exit, gained_second,
                  slack, block_max, bound):  # fmt: skip
    """Raise every row's per-block bound by what a move at ``position`` can add to a prefix score.

    Rows before the move: samples whose fate from ``position`` on changed score ``before_rise``
    more there (and every sample going through pays the exit's MAC change: ``before_uniform``).
    Rows after it: ``lost`` samples no longer reach them, ``gained`` ones now do.
    """
    n_rows, n_blocks = slack.shape
    rises = np.zeros((n_rows, n_blocks))
    totals = np.zeros((n_rows, n_blocks))
    here, after = row_start[position], row_start[position + 1]
    for z in range(before.shape[0]):
        first, last = (0, here) if before_through[z] else (row_start[before_exit[z]], row_start[before_exit[z] + 1])
        for row in range(first, last):
            _add_change(rank, row, before[z], before_rise[z], rises, totals)
    _reach_changes(-1.0, lost, lost_exit, lost_second, position, row_start, row_position, rank, row_correct,
                   correct_here, path, a, b, rises, totals)  # fmt: skip
    _reach_changes(1.0, gained, gained_exit, gained_second, position, row_start, row_position, rank, row_correct,
                   correct_here, path, a, b, rises, totals)  # fmt: skip
    for row in range(n_rows):
        if here <= row < after:
            continue
        entering = before_uniform if row < here else 0.0
        top = -np.inf
        for block in range(n_blocks):
            slack[row, block] += entering + rises[row, block]
            entering += totals[row, block]
            top = max(top, block_max[row, block] + slack[row, block])
        bound[row] = top


class GreedyState:
    """One lambda's configuration under Alg. 2, kept up to date move by move.

    Per sample it keeps where it leaves (``exit_at``) and where it would leave if that exit were
    not there (``second``): with them the totals with any one position's exit disabled (the base
    of every move there, eq. 13) cost O(M) per round for all positions together.
    """

    def __init__(self, problem: SearchProblem, lam: float) -> None:
        p = self.problem = problem
        n_pos, m, n_rows = p.num_positions, p.num_samples, len(p.row_position)
        self.lam = lam
        self.a = lam / p.final_correct_count
        self.b = (1.0 - lam) / (m * p.total_macs)
        self.exits, self.thresholds = p.empty()
        self.exit_here = np.zeros((n_pos, m), dtype=bool)
        self.exit_here[-1] = True
        self.correct_here = np.zeros((n_pos, m), dtype=np.int8)
        self.correct_here[-1] = p.final_correct
        self.exit_at = np.full(m, n_pos - 1, dtype=np.int64)
        self.second = np.full(m, n_pos - 1, dtype=np.int64)
        self.path = np.cumsum(p.step_macs(self.exits))
        self.prefix = np.zeros(n_rows, dtype=np.int64)
        self.gain = np.zeros(n_rows, dtype=np.int64)
        self.saved = np.zeros(n_rows, dtype=np.int64)
        self.score = np.zeros(n_rows)
        self.bound = np.zeros(n_rows)
        n_blocks = -(-m // BLOCK)
        self.block_max = np.zeros((n_rows, n_blocks))
        self.slack = np.zeros((n_rows, n_blocks))
        self.valid = np.zeros(n_rows, dtype=bool)
        self._reach = np.empty(m, dtype=bool)
        self._carry_correct = np.empty(m, dtype=np.int8)
        self._carry_macs = np.empty(m, dtype=np.int64)
        for n in range(n_pos - 1):
            self._evaluate(n, p.rows_at[n])

    def _position_totals(self):
        """Total correct answers and MACs now, and with each position's exit disabled."""
        p, n_pos = self.problem, self.problem.num_positions
        samples = np.arange(p.num_samples)
        leaving = np.bincount(self.exit_at, minlength=n_pos)
        reach_count = np.cumsum(leaving[::-1])[::-1]
        correct_at = self.correct_here[self.exit_at, samples]
        correct_next = self.correct_here[self.second, samples]
        correct, macs = int(correct_at.sum()), int(leaving @ self.path)
        # Disabling n: its leavers go on to their second exit, everyone passing n skips its exit's MACs.
        moved = np.bincount(self.exit_at, weights=correct_next - correct_at.astype(np.int64), minlength=n_pos)
        pairs = np.bincount(self.exit_at * n_pos + self.second, minlength=n_pos * n_pos).reshape(n_pos, n_pos)
        exit_macs = p.exit_macs[np.arange(n_pos), self.exits]
        off_correct = correct + np.rint(moved).astype(np.int64)
        off_macs = macs - exit_macs * reach_count - leaving * self.path + pairs @ self.path
        return correct, macs, off_correct[:-1], off_macs[:-1], reach_count[:-1]

    def _evaluate(self, position: int, rows: np.ndarray) -> None:
        """Exact best prefix of ``rows`` (all at ``position``) under the current configuration."""
        p = self.problem
        reach, carry_correct, carry_macs = self._reach, self._carry_correct, self._carry_macs
        _carry(position, self.exit_at, self.second, self.correct_here, self.path, reach, carry_correct, carry_macs)
        _best_prefixes(rows, p.order, p.sorted_correct, p.ends, reach, carry_correct, carry_macs, self.a, self.b,
                       self.prefix, self.gain, self.saved, self.score, self.block_max)  # fmt: skip
        self.bound[rows] = self.score[rows]
        self.slack[rows] = 0.0
        self.valid[rows] = True

    def best_move(self) -> tuple[int, int, float] | None:
        """Alg. 2 lines 4-10: the move (position, k, threshold) that lowers eq. 12 most, or None.
        Ties go to the first row (then to the highest threshold); disabling must be strictly better."""
        p, lam = self.problem, self.lam
        correct, macs, off_correct, off_macs, reach_count = self._position_totals()
        current = float(p.objective(lam, correct, macs))
        pos = p.row_position
        base_macs = off_macs[pos] + reach_count[pos] * p.row_exit_macs
        values = np.full(len(pos), np.inf)
        lower = lam - self.a * off_correct[pos] + self.b * base_macs - self.bound
        enabled = np.flatnonzero(self.exits[:-1] > 0)
        disable = p.objective(lam, off_correct, off_macs)
        best_disable = float(disable[enabled].min()) if len(enabled) else np.inf
        fresh = self.valid
        while True:
            values[fresh] = p.objective(
                lam, off_correct[pos[fresh]] + self.gain[fresh], base_macs[fresh] - self.saved[fresh]
            )
            lower[fresh] = values[fresh]
            limit = min(current, best_disable, float(values.min())) + BOUND_MARGIN
            pending = np.flatnonzero(~self.valid & (lower <= limit))
            if not len(pending):
                break
            position = int(pos[pending[np.argmin(lower[pending])]])
            rows = pending[pos[pending] == position]
            self._evaluate(position, rows)
            fresh = np.zeros_like(self.valid)
            fresh[rows] = True
        row = int(np.argmin(values))
        if best_disable < values[row]:
            if best_disable < current:
                return int(enabled[np.argmin(disable[enabled])]), 0, 1.0
            return None
        if values[row] < current:
            return int(pos[row]), int(p.row_k[row]), float(p.sorted_conf[row, self.prefix[row]])
        return None

    def apply(self, position: int, k: int, threshold: float) -> None:
        """Alg. 2 lines 12-13, then the bookkeeping: exits per sample, the rows' bounds."""
        p, n_pos = self.problem, self.problem.num_positions
        old_exit_at, old_second, old_path = self.exit_at.copy(), self.second.copy(), self.path
        old_correct = self.correct_here[position].copy()
        leaves = self.exit_here[position].copy()
        if k:
            self.exit_here[position] = should_exit(p.records.confidence[position, k - 1], threshold)
            self.correct_here[position] = p.records.correct[position, k - 1]
        else:
            self.exit_here[position] = False
            self.correct_here[position] = 0
        self.exits[position], self.thresholds[position] = k, threshold
        self.path = np.cumsum(p.step_macs(self.exits))
        flipped = np.flatnonzero(leaves != self.exit_here[position])
        if len(flipped):
            here = self.exit_here[:, flipped]
            first = np.argmax(here, axis=0)
            here[first, np.arange(len(flipped))] = False
            self.exit_at[flipped] = first
            self.second[flipped] = np.where(first < n_pos - 1, np.argmax(here, axis=0), n_pos - 1)

        # Rows before the move see a sample's fate from `position` on (where it leaves, if it
        # carries on past the row): its first exit at or after `position`.
        through = old_exit_at >= position
        affected = np.flatnonzero(through | (old_second >= position))
        through = through[affected]
        was = np.where(through, old_exit_at[affected], old_second[affected])
        now = np.where(through, self.exit_at[affected], self.second[affected])
        was_correct = np.where(was == position, old_correct[affected], self.correct_here[was, affected])
        rise = self.b * (old_path[now] - old_path[was]) - self.a * (self.correct_here[now, affected] - was_correct)
        changed = rise != 0.0
        extra_macs = int(self.path[-1] - old_path[-1])
        # Rows after it: samples that leave at `position` now stop reaching them, and vice versa.
        lost = np.flatnonzero((old_exit_at > position) & (self.exit_at == position))
        gained = np.flatnonzero((old_exit_at == position) & (self.exit_at > position))
        _raise_bounds(position, p.sample_rank, p.row_start, p.row_position, p.sample_row_correct, self.correct_here,
                      self.path, self.a, self.b,
                      affected[changed], rise[changed], old_exit_at[affected][changed], through[changed],
                      self.b * max(extra_macs, 0) * len(affected),
                      lost, old_exit_at[lost], old_second[lost], gained, self.exit_at[gained], self.second[gained],
                      self.slack, self.block_max, self.bound)  # fmt: skip
        self.valid &= p.row_position == position
