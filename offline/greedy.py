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

from .objective import MoveTables, SearchProblem

BLOCK = 256
# Objective units: far above the rounding between a bound and an exact value (~1e-15), far
# below any real difference between moves (one sample moves eq. 12 by about 1 / M).
BOUND_MARGIN = 1e-9


@njit(cache=True)
def _scan_row(row, gain, saved, ends, a, b, out_prefix, out_gain, out_saved, out_score, block_max):
    """First argmax over tie-group ends of a * gain + b * saved, from one row's exact cumulative
    sums (scored as ``MoveTables.best_moves`` scores them), and the best score of every block."""
    top, top_prefix = -np.inf, 0
    block_top = -np.inf
    m = gain.shape[0]
    for i in range(m):
        if ends[i]:
            score = a * gain[i] + b * saved[i]
            if score > top:
                top, top_prefix = score, i
            block_top = max(block_top, score)
        if (i + 1) % BLOCK == 0 or i == m - 1:
            block_max[row, i // BLOCK] = block_top
            block_top = -np.inf
    out_prefix[row], out_gain[row], out_saved[row], out_score[row] = (
        top_prefix,
        gain[top_prefix],
        saved[top_prefix],
        top,
    )


@njit(cache=True)
def _best_of_sums(gain, saved, ends, a, b, out_prefix, out_gain, out_saved, out_score, block_max):
    """``_scan_row`` for every row of precomputed cumulative sums."""
    for row in range(gain.shape[0]):
        _scan_row(row, gain[row], saved[row], ends[row], a, b, out_prefix, out_gain, out_saved, out_score, block_max)


@njit(cache=True)
def _best_prefixes(rows, order, sorted_correct, ends, reach, carry_correct, carry_macs, a, b, out_prefix, out_gain,
                   out_saved, out_score, block_max):  # fmt: skip
    """``_scan_row`` for ``rows`` (all at one position), their cumulative sums built from the
    samples' reach and carry-on fates at that position."""
    m = order.shape[1]
    gain = np.empty(m, dtype=np.int64)
    saved = np.empty(m, dtype=np.int64)
    for row in rows:
        gain_sum, saved_sum = 0, 0
        for i in range(m):
            sample = order[row, i]
            if reach[sample]:
                gain_sum += sorted_correct[row, i] - carry_correct[sample]
                saved_sum += carry_macs[sample]
            gain[i], saved[i] = gain_sum, saved_sum
        _scan_row(row, gain, saved, ends[row], a, b, out_prefix, out_gain, out_saved, out_score, block_max)


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
def _refresh_exits(samples, exit_here, exit_at, second):
    """First and second exit position of ``samples`` (the final head always takes them)."""
    last = exit_here.shape[0] - 1
    for sample in samples:
        first, then = -1, last
        for n in range(last + 1):
            if exit_here[n, sample]:
                if first >= 0:
                    then = n
                    break
                first = n
        exit_at[sample], second[sample] = first, then


@njit(cache=True)
def _totals(exit_at, second, correct_here, path, exit_macs):
    """Total correct answers and MACs, and the same with each position's exit disabled (its
    leavers go on to their second exit, everyone passing it skips the exit's MACs)."""
    n_pos = path.shape[0]
    leaving = np.zeros(n_pos, dtype=np.int64)
    moved_correct = np.zeros(n_pos, dtype=np.int64)
    moved_macs = np.zeros(n_pos, dtype=np.int64)
    correct, macs = 0, 0
    for sample in range(exit_at.shape[0]):
        leave, then = exit_at[sample], second[sample]
        right = correct_here[leave, sample]
        leaving[leave] += 1
        correct += right
        macs += path[leave]
        moved_correct[leave] += correct_here[then, sample] - right
        moved_macs[leave] += path[then] - path[leave]
    reach_count = np.cumsum(leaving[::-1])[::-1]
    off_correct = correct + moved_correct
    off_macs = macs - exit_macs * reach_count + moved_macs
    return correct, macs, off_correct[:-1], off_macs[:-1], reach_count[:-1]


@njit(cache=True)
def _raise_bounds(position, samples, old_exit, old_second, old_correct, exit_at, second, correct_here, old_path, path,
                  a, b, uniform, rank, row_start, row_position, row_correct, slack, block_max, bound):  # fmt: skip
    """Raise every row's per-block bound by what the move at ``position`` can add to a prefix
    score there: ``samples`` are those whose decision or correctness at ``position`` changed.

    Rows before the move see a sample's fate from ``position`` on (where it leaves if it carries
    on past the row); every sample going through also pays the exit's MAC change (``uniform``
    covers it). Rows after the move lose the samples that now leave at ``position`` and gain
    those that no longer do.
    """
    n_rows, n_blocks = slack.shape
    rises = np.zeros((n_rows, n_blocks))
    totals = np.zeros((n_rows, n_blocks))
    here = row_start[position]
    for z in range(samples.shape[0]):
        sample, was_leave, was_then = samples[z], old_exit[z], old_second[z]
        leave, then = exit_at[sample], second[sample]
        if was_leave >= position or was_then >= position:
            through = was_leave >= position
            fate, new_fate = (was_leave, leave) if through else (was_then, then)
            fate_correct = old_correct[z] if fate == position else correct_here[fate, sample]
            rise = b * (old_path[new_fate] - old_path[fate]) - a * (correct_here[new_fate, sample] - fate_correct)
            first, last = (0, here) if through else (row_start[was_leave], row_start[was_leave + 1])
            for row in range(first, last):
                block = rank[sample, row] // BLOCK
                totals[row, block] += rise
                rises[row, block] += max(rise, 0.0)
        if was_leave > position and leave == position:
            sign, leave, then = -1.0, was_leave, was_then
        elif was_leave == position and leave > position:
            sign = 1.0
        else:
            continue
        for row in range(row_start[position + 1], row_start[leave + 1]):
            n = row_position[row]
            fate = leave if leave > n else then
            change = sign * (a * (row_correct[sample, row] - correct_here[fate, sample]) + b * (path[fate] - path[n]))
            block = rank[sample, row] // BLOCK
            totals[row, block] += change
            rises[row, block] += max(change, 0.0)
    for row in range(n_rows):
        if row_position[row] == position:
            continue
        entering = uniform if row < here else 0.0
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

    def __init__(self, problem: SearchProblem, lam: float, start: MoveTables) -> None:
        """``start``: the tables of the empty configuration, where every lambda starts."""
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
        self.valid = np.ones(n_rows, dtype=bool)
        self._reach = np.empty(m, dtype=bool)
        self._carry_correct = np.empty(m, dtype=np.int8)
        self._carry_macs = np.empty(m, dtype=np.int64)
        _best_of_sums(start.gain_correct, start.saved_macs, p.ends, self.a, self.b, self.prefix, self.gain, self.saved,
                      self.score, self.block_max)  # fmt: skip
        self.bound[:] = self.score

    def _position_totals(self):
        exit_macs = self.problem.exit_macs[np.arange(self.problem.num_positions), self.exits]
        return _totals(self.exit_at, self.second, self.correct_here, self.path, exit_macs)

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
        p = self.problem
        old_path, old_correct = self.path, self.correct_here[position].copy()
        leaves = self.exit_here[position].copy()
        if k:
            self.exit_here[position] = should_exit(p.records.confidence[position, k - 1], threshold)
            self.correct_here[position] = p.records.correct[position, k - 1]
        else:
            self.exit_here[position] = False
            self.correct_here[position] = 0
        self.exits[position], self.thresholds[position] = k, threshold
        self.path = np.cumsum(p.step_macs(self.exits))
        flipped = leaves != self.exit_here[position]
        # The samples whose decision or correctness at `position` changed: no other fate moved.
        samples = np.flatnonzero(flipped | (leaves & (old_correct != self.correct_here[position])))
        old_exit, old_second = self.exit_at[samples], self.second[samples]
        _refresh_exits(np.flatnonzero(flipped), self.exit_here, self.exit_at, self.second)
        self.valid &= p.row_position == position
        # Rows before `position` see every sample that would carry on through it pay its exit's MAC change.
        uniform = self.b * max(int(self.path[-1] - old_path[-1]), 0) * np.count_nonzero(self.second >= position)
        _raise_bounds(position, samples, old_exit, old_second, old_correct[samples], self.exit_at, self.second,
                      self.correct_here, old_path, self.path, self.a, self.b, uniform, p.sample_rank, p.row_start,
                      p.row_position, p.sample_row_correct, self.slack, self.block_max, self.bound)  # fmt: skip
