"""The configuration search against brute force and hand computations (paper eq. 10-13)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dyce.config import ExitConfiguration
from dyce.macs import MacTable
from dyce.simulate import ExitRecords, simulate
from offline.bank_builder import mark_dominated, metrics
from offline.objective import SearchProblem, configuration_totals, move_tables
from offline.search import adaptive_grid, baseline, iterative, single_pass

LAMBDAS = (0.0, 0.2, 0.5, 0.8, 0.9, 0.97, 1.0)


def random_problem(seed: int, positions: int = 4, kinds: int = 2, samples: int = 12, levels: int = 6):
    """Small records with deliberate confidence ties (few distinct levels)."""
    rng = np.random.default_rng(seed)
    confidence = rng.choice(np.linspace(0.3, 1.0, levels), size=(positions, kinds, samples)).astype(np.float32)
    correct = rng.random((positions, kinds, samples)) < np.linspace(0.5, 0.9, positions)[:, None, None]
    correct[-1, 0, 0] = True  # the final head gets at least one right
    confidence[-1, 1:], correct[-1, 1:] = np.nan, False
    segments = tuple(int(s) for s in rng.integers(10, 40, positions))
    exit_macs = tuple(tuple(int(x) for x in rng.integers(1, 6, kinds)) for _ in range(positions - 1)) + ((),)
    macs = MacTable(segment_macs=segments, head_macs=3, exit_macs=exit_macs)
    return ExitRecords(confidence, correct, (kinds,) * (positions - 1) + (1,)), macs


def objective(records, macs, lam, config) -> float:
    result = simulate(records, config, macs)
    return lam * (1 - result.relative_accuracy) + (1 - lam) * result.relative_macs


def options(records: ExitRecords, n: int) -> list[tuple[int, float]]:
    """Every distinct behaviour at position n: off, or candidate k with any recorded threshold."""
    found = [(0, 1.0)]
    for k in range(1, records.num_candidates[n] + 1):
        found += [(k, float(t)) for t in np.unique(records.confidence[n, k - 1])]
    return found


def config_of(choice) -> ExitConfiguration:
    return ExitConfiguration(exits=tuple(k for k, _ in choice) + (1,), thresholds=tuple(t for _, t in choice) + (0.0,))


def brute_force_optimum(records, macs, lam) -> float:
    per_position = [options(records, n) for n in range(records.num_positions - 1)]
    return min(objective(records, macs, lam, config_of(c)) for c in itertools.product(*per_position))


def test_objective_matches_a_hand_computation():
    # 2 positions (one early exit + the final head), 4 samples.
    confidence = np.array([[[0.9, 0.6, 0.95, 0.4]], [[1.0, 1.0, 1.0, 1.0]]], dtype=np.float32)
    correct = np.array([[[True, False, False, True]], [[True, True, False, True]]])
    records = ExitRecords(confidence, correct, (1, 1))
    macs = MacTable(segment_macs=(30, 60), head_macs=10, exit_macs=((5,), ()))
    config = ExitConfiguration(exits=(1, 1), thresholds=(0.9, 0.0))
    # Samples 0 and 2 exit early (0.9 >= 0.9 in float32, 0.95): right, wrong. 1 and 3 reach the head:
    # both right. A = (3 correct / 4) / A_ori (3/4) = 1. C: early (30+5)/100, late (30+5+60+10)/100.
    expected_a = (3 / 4) / (3 / 4)
    expected_c = (2 * 0.35 + 2 * 1.05) / 4
    lam = 0.7
    problem = SearchProblem(records, macs)
    correct_total, mac_total = configuration_totals(problem, np.array(config.exits), np.array(config.thresholds))
    assert problem.objective(lam, correct_total, mac_total) == pytest.approx(
        lam * (1 - expected_a) + (1 - lam) * expected_c
    )
    assert objective(records, macs, lam, config) == pytest.approx(lam * (1 - expected_a) + (1 - lam) * expected_c)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_minimiser_is_exact_for_every_move(seed):
    """Each candidate's best threshold and value equal brute force over every recorded threshold,
    from a configuration that already has exits (so reach and carry-on fates matter)."""
    records, macs = random_problem(seed)
    problem = SearchProblem(records, macs)
    start = ExitConfiguration(exits=(2, 0, 1, 1), thresholds=(0.86, 1.0, 0.72, 0.0))
    exits, thresholds = np.array(start.exits), np.array(start.thresholds)
    tables = move_tables(problem, exits, thresholds)
    for lam in LAMBDAS:
        _, best_t, values = tables.best_moves(problem, lam)
        for row, (n, k) in enumerate(zip(problem.row_position, problem.row_k, strict=True)):
            brute = []
            for t in np.unique(records.confidence[n, k - 1])[::-1]:
                moved = list(zip(start.exits[:-1], start.thresholds[:-1], strict=True))
                moved[n] = (int(k), float(t))
                brute.append((objective(records, macs, lam, config_of(moved)), -t))
            best_value, neg_t = min(brute)
            assert values[row] == pytest.approx(best_value, abs=1e-12)
            # Ties go to the highest threshold (fewest samples exit).
            assert best_t[row] == pytest.approx(-neg_t)


def assert_searches_reach_brute_force(records: ExitRecords, costs: MacTable) -> None:
    """Single-pass and iterative, searching on ``costs``, reach brute force's optimum at every lambda."""
    problem = SearchProblem(records, costs)
    sp, it = single_pass(problem, LAMBDAS), iterative(problem, LAMBDAS)
    for lam in LAMBDAS:
        best = brute_force_optimum(records, costs, lam)
        assert objective(records, costs, lam, sp[lam]) == pytest.approx(best, abs=1e-12)
        assert objective(records, costs, lam, it[lam]) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_one_early_position_searches_reach_the_brute_force_optimum(seed):
    assert_searches_reach_brute_force(*random_problem(seed, positions=2, kinds=3, samples=15))


def test_hand_made_records_with_a_known_optimum():
    """Position 0's exit is right and confident on the easy half, position 1's on the rest; the
    final head is right everywhere. Cheap and lossless: exit 1 at 0 with t=0.9, exit 1 at 1 with t=0.8."""
    m = 8
    confidence = np.full((3, 1, m), 0.5, dtype=np.float32)
    correct = np.zeros((3, 1, m), dtype=bool)
    confidence[0, 0, :4], correct[0, 0, :4] = 0.9, True
    confidence[1, 0, 4:], correct[1, 0, 4:] = 0.8, True
    confidence[2, 0], correct[2, 0] = 1.0, True
    records = ExitRecords(confidence, correct, (1, 1, 1))
    macs = MacTable(segment_macs=(10, 10, 78), head_macs=2, exit_macs=((1,), (1,), ()))
    # Thresholds are recorded confidences, so float32 values.
    optimum = ExitConfiguration(exits=(1, 1, 1), thresholds=(float(np.float32(0.9)), float(np.float32(0.8)), 0.0))
    problem = SearchProblem(records, macs)
    for lam in (0.5, 0.9, 0.99):
        assert brute_force_optimum(records, macs, lam) == pytest.approx(objective(records, macs, lam, optimum))
        assert single_pass(problem, [lam])[lam] == optimum
        assert iterative(problem, [lam])[lam] == optimum


@pytest.mark.parametrize("seed", range(3))
def test_iterative_stops_at_a_configuration_no_single_move_improves(seed):
    """Alg. 2's stopping rule, checked by brute force over every single-position move."""
    assert_iterative_stops_where_no_single_move_improves(*random_problem(seed, positions=4, kinds=2, samples=14))


def assert_iterative_stops_where_no_single_move_improves(records: ExitRecords, costs: MacTable) -> None:
    for lam, config in iterative(SearchProblem(records, costs), LAMBDAS).items():
        current = objective(records, costs, lam, config)
        base = list(zip(config.exits[:-1], config.thresholds[:-1], strict=True))
        for n in range(records.num_positions - 1):
            for option in options(records, n):
                moved = base.copy()
                moved[n] = option
                assert objective(records, costs, lam, config_of(moved)) >= current - 1e-12


def plain_iterative(problem: SearchProblem, lam: float) -> ExitConfiguration:
    """Alg. 2 with no shortcut: every round, every row's full tables (``move_tables``)."""
    exits, thresholds = problem.empty()
    while True:
        tables = move_tables(problem, exits, thresholds)
        current = problem.objective(lam, *configuration_totals(problem, exits, thresholds))
        _, best_t, values = tables.best_moves(problem, lam)
        row = int(np.argmin(values))
        move, value = (problem.row_position[row], problem.row_k[row], float(best_t[row])), values[row]
        disable = problem.objective(lam, tables.off_correct, tables.off_macs)
        enabled = np.flatnonzero(exits[:-1] > 0)
        if len(enabled) and disable[enabled].min() < value:
            off = enabled[np.argmin(disable[enabled])]
            move, value = (off, 0, 1.0), disable[off]
        if not value < current:
            return problem.configuration(exits, thresholds)
        exits, thresholds = exits.copy(), thresholds.copy()
        exits[move[0]], thresholds[move[0]] = move[1], move[2]


@pytest.mark.parametrize("seed", range(3))
def test_iterative_makes_the_moves_of_plain_alg2(seed):
    """The bounded, incremental rounds pick exactly the moves of exhaustive rounds, on records
    large enough for the per-block bounds (several blocks per row) to prune."""
    records, macs = random_problem(seed, positions=9, kinds=3, samples=700, levels=300)
    problem = SearchProblem(records, macs)
    lams = (0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0)
    found = iterative(problem, lams)
    for lam in lams:
        assert found[lam] == plain_iterative(problem, lam)


@pytest.mark.parametrize("seed", range(3))
def test_baseline_is_the_best_shared_type_and_threshold(seed):
    records, macs = random_problem(seed, positions=4, kinds=2, samples=14)
    problem = SearchProblem(records, macs)
    found = baseline(problem, LAMBDAS)
    n_early = records.num_positions - 1
    shared = [ExitConfiguration.final_only(records.num_positions)]
    for k in (1, 2):
        for t in np.unique(records.confidence[:n_early, k - 1]):
            shared.append(config_of([(k, float(t))] * n_early))
    for lam, config in found.items():
        assert objective(records, macs, lam, config) == pytest.approx(
            min(objective(records, macs, lam, c) for c in shared), abs=1e-12
        )


def test_search_figures_come_from_the_shared_simulation():
    records, macs = random_problem(7, positions=5, kinds=3, samples=40)
    problem = SearchProblem(records, macs)
    for config in iterative(problem, LAMBDAS).values():
        result = simulate(records, config, macs)
        figures = metrics(records, config, macs)
        assert figures.accuracy == result.accuracy and figures.relative_macs == result.relative_macs
        correct, mac_total = configuration_totals(problem, np.array(config.exits), np.array(config.thresholds))
        assert correct / records.num_samples == pytest.approx(result.accuracy)
        assert mac_total / (records.num_samples * macs.total_macs) == pytest.approx(result.relative_macs)


def test_adaptive_grid_refines_where_configurations_change():
    records, macs = random_problem(3, positions=6, kinds=3, samples=200, levels=60)
    problem = SearchProblem(records, macs)
    coarse = single_pass(problem, [0.0, 0.5, 1.0])
    refined = adaptive_grid(lambda lams: single_pass(problem, lams), [0.0, 0.5, 1.0], min_distinct=8)
    assert set(coarse) <= set(refined)
    assert len(set(refined.values())) >= min(8, len(set(single_pass(problem, np.linspace(0, 1, 401)).values())))


def test_dominated_entries_are_marked_not_dropped():
    from dyce.bank import BankEntry, SplitMetrics

    def entry(acc, macs):
        figures = SplitMetrics(accuracy=acc, relative_accuracy=acc, relative_macs=macs, exit_rates=(1.0,))
        return BankEntry(lam=0.5, algorithm="x", config=ExitConfiguration.final_only(1), search=figures)

    marked = mark_dominated([entry(0.9, 0.5), entry(0.8, 0.6), entry(0.9, 0.5), entry(0.95, 0.7)])
    assert [e.dominated for e in marked] == [False, True, True, False]


def _front(points):
    """Pareto front by brute force: points no other point beats (>= accuracy, <= MACs, one strictly)."""
    kept = {
        p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in points)
    }
    return sorted(kept, key=lambda p: p[1])


@pytest.mark.parametrize("seed", range(3))
def test_adaptive_grid_leaves_no_front_hole_a_finer_grid_would_fill(seed):
    """After refinement, every hole wider than 0.01 relative MACs between adjacent front entries
    is one that a 4001-lambda scan cannot fill either: no configuration of the scan lands inside
    it without being beaten by the refined front."""
    records, macs = random_problem(seed, positions=6, kinds=3, samples=400, levels=200)
    problem = SearchProblem(records, macs)

    def measure(config):
        result = simulate(records, config, macs)
        return result.accuracy, result.relative_macs

    refined = adaptive_grid(lambda lams: single_pass(problem, lams), min_distinct=5, measure=measure, min_gap=1e-5)
    front = _front({measure(c) for c in set(refined.values())})
    scan = {measure(c) for c in set(single_pass(problem, list(np.linspace(0, 1, 4001))).values())}
    holes = [(lo, hi) for lo, hi in zip(front, front[1:], strict=False) if hi[1] - lo[1] > 0.01]
    for lo, hi in holes:
        filling = [p for p in scan if lo[1] < p[1] < hi[1] and p[0] > lo[0]]
        assert not filling, (lo, hi, filling)
    # and the coarse grid alone did leave such holes, so the refinement had work to do
    coarse = _front({measure(c) for c in set(single_pass(problem, [i / 100 for i in range(101)]).values())})
    assert len(front) > len(coarse)
