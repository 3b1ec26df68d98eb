"""Configuration search (paper Sec. V-B): single-pass (Alg. 3), iterative (Alg. 2) and the paper's
baseline (one exit type at every position, one shared threshold), over a grid of lambdas.

Every lambda runs its own search. In single-pass, lambdas whose searches stand on the same
configuration share that configuration's cumulative sums (``objective.MoveTables``), so the work
of the common positions is done once; the iterative search keeps each lambda's state up to date
move by move instead (``greedy.GreedyState``). The searches only *choose* configurations: the
figures kept for them come from ``dyce.simulate.simulate``, the one shared rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from dyce.config import ExitConfiguration
from dyce.rule import should_exit

from .greedy import GreedyState
from .objective import MoveTables, SearchProblem, move_tables

UNIFORM_GRID = tuple(round(i / 100, 2) for i in range(101))


def _key(exits: np.ndarray, thresholds: np.ndarray) -> bytes:
    return exits.tobytes() + np.where(exits > 0, thresholds, 1.0).tobytes()


def iterative(problem: SearchProblem, lams: Sequence[float], max_rounds: int | None = None, progress: bool = False):
    """Alg. 2 for every lambda: from the empty configuration, each round applies the single best
    move (k_c, t_c) at any position, k_c = 0 (disable) included, until no move strictly lowers
    eq. 12. Each round's best move is exact (``greedy.GreedyState``)."""
    max_rounds = max_rounds or 4 * len(problem.row_position) + problem.num_positions
    start = move_tables(problem, *problem.empty())
    found = {}
    for lam in tqdm(lams, desc="iterative search", leave=False, disable=not progress):
        state = GreedyState(problem, lam, start)
        for _ in range(max_rounds):
            move = state.best_move()
            if move is None:
                break
            state.apply(*move)
        else:
            raise RuntimeError(f"iterative search did not converge within {max_rounds} rounds for lambda {lam}")
        found[lam] = problem.configuration(state.exits, state.thresholds)
    return found


def single_pass(problem: SearchProblem, lams: Sequence[float], progress: bool = False):
    """Alg. 3 for every lambda: positions in order, each gets the best (k_c, t_c) given the
    choices before it and nothing after it (so a sample passing it ends at the final head)."""
    n_pos, m = problem.num_positions, problem.num_samples
    exits0, thresholds0 = problem.empty()
    states = {lam: (exits0.copy(), thresholds0.copy()) for lam in lams}
    # Shared per group: which samples still run, and what those that left scored and cost.
    groups: dict[bytes, tuple[list[float], np.ndarray, int, int]] = {
        _key(exits0, thresholds0): (list(lams), np.ones(m, dtype=bool), 0, 0)
    }
    final_correct = problem.final_correct.astype(np.int64)
    after = np.concatenate([np.cumsum(problem.segment_macs[::-1])[::-1][1:], [0]]) + problem.exit_macs[-1, 1]
    for n in tqdm(range(n_pos - 1), desc="single-pass search", leave=False, disable=not progress):
        rows = problem.rows_at[n]
        next_groups: dict[bytes, tuple[list[float], np.ndarray, int, int]] = {}
        for members, reach, left_correct, left_macs in groups.values():
            exits, _ = states[members[0]]
            arrive = int(problem.step_macs(exits)[:n].sum())
            sorted_reach = reach[problem.order[rows]]
            reached = int(reach.sum())
            gain = np.cumsum(problem.sorted_gain_over_final[rows] * sorted_reach, axis=1, dtype=np.int32)
            saved = np.cumsum(sorted_reach, axis=1) * int(after[n])
            off = np.zeros(n_pos, dtype=np.int64)
            off_correct, off_macs = off.copy(), off.copy()
            off_correct[n] = left_correct + int(final_correct[reach].sum())
            off_macs[n] = left_macs + reached * (arrive + int(problem.segment_macs[n]) + int(after[n]))
            reach_count = off.copy()
            reach_count[n] = reached
            tables = MoveTables(rows, gain, saved, off_correct, off_macs, reach_count)
            current = {lam: float(problem.objective(lam, off_correct[n], off_macs[n])) for lam in members}
            for lam in members:
                _, thresholds, values = tables.best_moves(problem, lam)
                i = int(np.argmin(values))
                if values[i] < current[lam]:
                    exits, ts = states[lam][0].copy(), states[lam][1].copy()
                    exits[n], ts[n] = problem.row_k[rows[i]], thresholds[i]
                    states[lam] = (exits, ts)
            for lam in members:
                key = _key(*states[lam])
                if key not in next_groups:
                    k = int(states[lam][0][n])
                    if k:
                        leaving = reach & should_exit(problem.records.confidence[n, k - 1], float(states[lam][1][n]))
                        exit_cost = arrive + int(problem.segment_macs[n] + problem.exit_macs[n, k])
                        next_groups[key] = (
                            [],
                            reach & ~leaving,
                            left_correct + int(problem.records.correct[n, k - 1][leaving].sum()),
                            left_macs + int(leaving.sum()) * exit_cost,
                        )
                    else:
                        next_groups[key] = ([], reach, left_correct, left_macs)
                next_groups[key][0].append(lam)
        groups = next_groups
    return {lam: problem.configuration(*states[lam]) for lam in lams}


def baseline(problem: SearchProblem, lams: Sequence[float]):
    """The paper's baseline: the same exit type at every early position and one threshold t
    shared by all of them; per lambda, the best type and the exact best t. With a saver stage,
    the saver takes part under every type, at the same threshold.

    For one type, as t falls a sample's exit position moves only when t passes a confidence that
    beats every earlier position's (a prefix maximum along the positions): each such event moves
    the sample from the next such position (or the final head) to this one. Sorting all events
    by confidence makes the objective for every distinct t a cumulative sum.
    """
    n_pos, m = problem.num_positions, problem.num_samples
    best: dict[float, tuple[float, ExitConfiguration]] = {}
    counts = np.asarray(problem.num_candidates[:-1], dtype=np.int64)
    rows = np.arange(n_pos - 1)
    for k in range(1, int(counts.max(initial=0)) + 1):
        # A position with fewer candidates uses its last one (a saver stage with one saver takes
        # part under every type); a position without candidates never exits.
        chosen = np.minimum(k, counts)
        column = np.maximum(chosen, 1) - 1
        conf = np.where((chosen > 0)[:, None], problem.records.confidence[rows, column], -np.inf).astype(np.float32)
        correct = np.vstack([problem.records.correct[rows, column], problem.final_correct[None]])
        exits = np.append(chosen, 1)
        path = np.cumsum(problem.step_macs(exits))
        earlier_max = np.vstack([np.full((1, m), -np.inf, np.float32), np.maximum.accumulate(conf, axis=0)[:-1]])
        record = conf > earlier_max
        # Next record position to the right (the final head if none): the sample's exit before the event.
        position = np.where(record, np.arange(n_pos - 1)[:, None], n_pos - 1)
        following = np.vstack([np.minimum.accumulate(position[::-1], axis=0)[::-1][1:], np.full((1, m), n_pos - 1)])
        ev_pos, ev_sample = np.nonzero(record)
        ev_from = following[ev_pos, ev_sample]
        ev_conf = conf[ev_pos, ev_sample]
        order = np.argsort(-ev_conf, kind="stable")
        ev_conf = ev_conf[order]
        d_correct = (correct[ev_pos, ev_sample].astype(np.int64) - correct[ev_from, ev_sample])[order]
        d_macs = (path[ev_pos] - path[ev_from])[order]
        is_end = np.append(ev_conf[:-1] != ev_conf[1:], True)
        start_correct = int(problem.final_correct.sum())
        start_macs = m * int(path[-1])
        correct_t = start_correct + np.cumsum(d_correct)[is_end]
        macs_t = start_macs + np.cumsum(d_macs)[is_end]
        thresholds = ev_conf[is_end]
        for lam in lams:
            values = problem.objective(lam, correct_t, macs_t)
            i = int(np.argmin(values))
            value, t = float(values[i]), float(thresholds[i])
            none_value = float(problem.objective(lam, start_correct, start_macs))
            if none_value <= value:  # no threshold helps: the best is never to exit early
                value, config = none_value, ExitConfiguration.final_only(n_pos)
            else:
                config = problem.configuration(exits, np.full(n_pos, t))
            if lam not in best or value < best[lam][0]:
                best[lam] = (value, config)
    return {lam: config for lam, (_, config) in best.items()}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (accuracy, relative MACs) points no other point beats, cheapest first."""
    front: list[tuple[float, float]] = []
    for acc, macs in sorted(points, key=lambda p: (p[1], -p[0])):
        if not front or acc > front[-1][0]:
            front.append((acc, macs))
    return front


def adaptive_grid(
    search,
    lams: Sequence[float] = UNIFORM_GRID,
    min_distinct: int = 50,
    max_lams: int = 1000,
    min_gap: float = 1e-4,
    measure: Callable[[ExitConfiguration], tuple[float, float]] | None = None,
    max_front_gap: float = 0.01,
) -> dict[float, ExitConfiguration]:
    """Refine lambda where neighbouring lambdas gave different configurations (a new one can
    only lie between two that differ), bisecting every such pair at once, round after round:

    1. until ``min_distinct`` distinct configurations exist;
    2. then, with ``measure(config) -> (accuracy, relative MACs)`` on the search split, only the
       pairs whose MACs span a hole wider than ``max_front_gap`` between adjacent entries of the
       Pareto front, until no such hole is left or no pair spanning one can be split any more
       (the lambdas closer than ``min_gap``: no lambda between them gives a new configuration,
       to that resolution).

    Stops at ``max_lams`` lambdas whatever is left. ``search(lams) -> {lam: configuration}``."""
    found = dict(search(list(lams)))
    scores: dict[ExitConfiguration, tuple[float, float]] = {}

    def score(config: ExitConfiguration) -> tuple[float, float]:
        if config not in scores:
            scores[config] = measure(config)  # type: ignore[misc]
        return scores[config]

    while len(found) < max_lams:
        ordered = sorted(found)
        pairs = [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if found[a] != found[b] and b - a > min_gap]
        if len(set(found.values())) < min_distinct:
            gaps = pairs
        elif measure is not None:
            front = pareto_front([score(c) for c in set(found.values())])
            holes = [(lo[1], hi[1]) for lo, hi in zip(front, front[1:], strict=False) if hi[1] - lo[1] > max_front_gap]
            gaps = []
            for a, b in pairs:
                low, high = sorted((score(found[a])[1], score(found[b])[1]))
                if any(low < hole_high and high > hole_low for hole_low, hole_high in holes):
                    gaps.append((a, b))
        else:
            gaps = []
        if not gaps:
            break
        midpoints = [round((a + b) / 2, 6) for a, b in gaps[: max_lams - len(found)]]
        found.update(search(midpoints))
    return dict(sorted(found.items()))
