"""Configuration-search speed at the paper's scale (Sec. VI-D: 4.9 min single-pass and 215.5 min
iterative on a GPU): 50 positions x 5 exit types x 50,000 samples, the default 101-lambda grid.

Records are SYNTHESISED (no 50-position model's confidences exist here), with realistic
structure: every sample has a difficulty, every candidate a skill that grows with depth and
exit size; the probability of being right is a logistic function of skill - difficulty; the
recorded confidence is that probability plus calibration noise, squashed into [1/C, 1] like a
softmax maximum (so deep exits saturate near 1 as real ones do); correctness is drawn from it.
MACs: 50 equal-ish segments, exits costing 0.01-1% of the model, like the paper's MLP exits.

    python bench/search_speed.py [--samples 50000] [--positions 50] [--kinds 5] [--lambdas 101] [--grid adaptive]

Last line: JSON with ``single_pass_s`` and ``iterative_s`` (the latter over ``iterative_lambdas``
lambdas, all of the grid unless ``--iterative-lambdas`` says fewer). ``iterative_s`` includes the
iterative search's own set-up (sample ranks, the empty configuration's tables) and, on the first
run after a fresh checkout, compiling its numba passes (~2-3 s; cached next to the module after).

``--grid adaptive`` times what ``dyce-offline search`` runs instead: the uniform grid refined
until 50 distinct configurations and no front hole wider than 0.01 relative MACs that a lambda
pair spans (``offline.search.adaptive_grid``); the JSON then also gives the lambdas each search
ended with and its front's widest hole.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import typer

from dyce.macs import MacTable
from dyce.simulate import ExitRecords, simulate
from offline.objective import SearchProblem
from offline.search import adaptive_grid, iterative, pareto_front, single_pass

NUM_CLASSES = 1000


def synthetic_problem(positions: int, kinds: int, samples: int, seed: int = 0) -> tuple[ExitRecords, MacTable]:
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 1.5, samples)
    depth = np.linspace(0.0, 1.0, positions)[:, None, None]
    size = np.linspace(0.0, 1.0, kinds)[None, :, None]
    skill = -2.0 + 5.0 * depth**0.7 + 0.6 * size
    skill = np.broadcast_to(skill, (positions, kinds, 1)).copy()
    skill[-1, 0] = 3.0  # the final head
    logit = skill - difficulty[None, None, :] + rng.normal(0.0, 0.8, (positions, kinds, samples))
    p_right = 1.0 / (1.0 + np.exp(-logit))
    correct = rng.random(p_right.shape) < p_right
    noisy = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, 0.7, logit.shape))))
    confidence = (1.0 / NUM_CLASSES + (1.0 - 1.0 / NUM_CLASSES) * noisy).astype(np.float32)
    confidence[-1, 1:], correct[-1, 1:] = np.nan, False
    num_candidates = (kinds,) * (positions - 1) + (1,)
    segment = rng.integers(80_000_000, 120_000_000, positions)
    exit_share = np.array([0.0001, 0.002, 0.005, 0.004, 0.01])[:kinds]
    exit_macs = tuple(tuple(int(s * 50 * exit_share[k] * 0.02) for k in range(kinds)) for s in segment[:-1]) + ((),)
    macs = MacTable(segment_macs=tuple(int(s) for s in segment), head_macs=2_000_000, exit_macs=exit_macs)
    return ExitRecords(confidence, correct, num_candidates), macs


def main(
    samples: int = 50_000,
    positions: int = 50,
    kinds: int = 5,
    lambdas: int = 101,
    iterative_lambdas: int = 0,
    seed: int = 0,
    grid: str = "uniform",
) -> None:
    """``--iterative-lambdas n`` times the iterative search on n evenly spread lambdas of the grid
    only (0: all of them), for when the whole grid would take too long; the JSON says which."""
    records, macs = synthetic_problem(positions, kinds, samples, seed)
    grid_kind = grid
    if grid_kind not in ("uniform", "adaptive"):
        raise typer.BadParameter("grid must be uniform or adaptive")
    lam_grid = [round(i / (lambdas - 1), 6) for i in range(lambdas)]
    iterative_grid = (
        lam_grid
        if not iterative_lambdas
        else [lam_grid[i] for i in np.linspace(0, lambdas - 1, iterative_lambdas).astype(int)]
    )
    start = time.perf_counter()
    problem = SearchProblem(records, macs)
    prepare_s = time.perf_counter() - start
    scores: dict = {}

    def measure(config):
        if config not in scores:
            result = simulate(records, config, macs)
            scores[config] = (result.accuracy, result.relative_macs)
        return scores[config]

    def run(search, lams):
        if grid_kind == "adaptive":
            return adaptive_grid(lambda ls: search(problem, ls, progress=True), lams, measure=measure)
        return search(problem, lams, progress=True)

    start = time.perf_counter()
    sp = run(single_pass, lam_grid)
    single_pass_s = time.perf_counter() - start
    start = time.perf_counter()
    it = run(iterative, iterative_grid)
    iterative_s = time.perf_counter() - start
    fronts = {}
    for name, configs in (("single_pass", sp), ("iterative", it)):
        results = [simulate(records, c, macs) for c in configs.values()]
        front = pareto_front([measure(c) for c in set(configs.values())])
        fronts[name] = {
            "lambdas_searched": len(configs),
            "front_points": len(front),
            "front_widest_hole": round(
                max((b[1] - a[1] for a, b in zip(front, front[1:], strict=False)), default=0), 4
            ),
            "distinct_configs": len(set(configs.values())),
            "mean_rel_macs": round(float(np.mean([r.relative_macs for r in results])), 4),
            "mean_rel_accuracy": round(float(np.mean([r.relative_accuracy for r in results])), 4),
        }
        print(name, fronts[name])
    figures = {
        "records": "synthetic (logistic difficulty/skill model, calibrated-noise confidences)",
        "positions": positions,
        "kinds": kinds,
        "samples": samples,
        "lambdas": lambdas,
        "grid": grid_kind,
        "prepare_s": round(prepare_s, 2),
        "single_pass_s": round(single_pass_s, 2),
        "iterative_s": round(iterative_s, 2),
        "iterative_lambdas": len(it),  # with --grid adaptive: the refined grid's
        "iterative_s_per_lambda": round(iterative_s / len(it), 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        **{f"{k}_{name}": v for name, f in fronts.items() for k, v in f.items()},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    typer.run(main)
