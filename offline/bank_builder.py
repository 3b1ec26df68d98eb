"""Step `search`: run the configuration searches on the search split's records and write the
bank (``dyce.bank.Bank``, ``<artifacts>/bank.json``) that the service loads.

Every configuration's figures (on search and on test) come from ``dyce.simulate.simulate``,
the rule shared with the runtime, never from the searches' own bookkeeping. Entries that
another entry Pareto-dominates on the search split (at least as accurate and no more MACs,
one of them strictly) and repeats of an earlier entry's figures are kept, marked
``dominated``.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import BaseModel

from dyce.bank import Bank, BankEntry, SplitMetrics
from dyce.config import ExitConfiguration
from dyce.macs import MacTable
from dyce.simulate import ExitRecords, simulate

from .layout import OfflineLayout
from .objective import SearchProblem
from .provenance import current_inputs, write_step_manifest
from .records import load_records
from .search import UNIFORM_GRID, adaptive_grid, baseline, iterative, single_pass

Algorithm = Literal["iterative", "single_pass", "baseline"]
ALGORITHMS: tuple[Algorithm, ...] = ("iterative", "single_pass", "baseline")


class SearchRun(BaseModel):
    algorithm: str
    grid: str
    lambdas: int
    distinct_configurations: int
    seconds: float


def metrics(records: ExitRecords, config: ExitConfiguration, macs: MacTable) -> SplitMetrics:
    result = simulate(records, config, macs)
    return SplitMetrics(
        accuracy=result.accuracy,
        relative_accuracy=result.relative_accuracy,
        relative_macs=result.relative_macs,
        exit_rates=tuple(float(r) for r in result.exit_rates),
    )


def mark_dominated(entries: list[BankEntry]) -> list[BankEntry]:
    points = np.array([(e.search.accuracy, e.search.relative_macs) for e in entries])
    marked = []
    for i, entry in enumerate(entries):
        acc, macs = points[i]
        better = (points[:, 0] >= acc) & (points[:, 1] <= macs) & ((points[:, 0] > acc) | (points[:, 1] < macs))
        repeat = ((points[:i, 0] == acc) & (points[:i, 1] == macs)).any()
        marked.append(entry.model_copy(update={"dominated": bool(better.any() or repeat)}))
    return marked


def run_algorithm(problem: SearchProblem, algorithm: Algorithm, grid: str, progress: bool = True):
    if algorithm == "baseline":  # one shared threshold per type: no per-position search to refine
        return baseline(problem, UNIFORM_GRID)
    search = {"iterative": iterative, "single_pass": single_pass}[algorithm]

    def run(lams):
        return search(problem, lams, progress=progress)

    def measure(config: ExitConfiguration) -> tuple[float, float]:
        result = simulate(problem.records, config, problem.macs)
        return result.accuracy, result.relative_macs

    return adaptive_grid(run, measure=measure) if grid == "adaptive" else run(list(UNIFORM_GRID))


def build_bank(
    layout: OfflineLayout,
    algorithms: tuple[Algorithm, ...] = ALGORITHMS,
    grid: Literal["adaptive", "uniform"] = "adaptive",
    progress: bool = True,
) -> tuple[Bank, list[SearchRun]]:
    inputs = current_inputs(layout, ("records",))
    manifest, records = load_records(layout)
    problem = SearchProblem(records["search"], manifest.macs)
    entries, runs = [], []
    for algorithm in algorithms:
        start = time.perf_counter()
        found = run_algorithm(problem, algorithm, grid, progress)
        runs.append(
            SearchRun(
                algorithm=algorithm,
                grid="uniform" if algorithm == "baseline" else grid,
                lambdas=len(found),
                distinct_configurations=len(set(found.values())),
                seconds=round(time.perf_counter() - start, 2),
            )
        )
        for lam, config in found.items():
            entries.append(
                BankEntry(
                    lam=lam,
                    algorithm=algorithm,
                    config=config,
                    search=metrics(records["search"], config, manifest.macs),
                    test=metrics(records["test"], config, manifest.macs) if "test" in records else None,
                )
            )
    bank = Bank(
        backbone=manifest.backbone,
        exits=manifest.exits,
        num_candidates=manifest.num_candidates,
        macs=manifest.macs,
        original_accuracy={split: r.original_accuracy for split, r in records.items()},
        entries=tuple(mark_dominated(entries)),
    )
    bank.save(layout.bank)
    layout.search_runs.write_text("[\n" + ",\n".join(run.model_dump_json() for run in runs) + "\n]\n")
    write_step_manifest(layout, "search", "search", search_recipe(algorithms, grid), inputs)
    return bank, runs


def search_recipe(algorithms: tuple[str, ...], grid: str) -> dict:
    return {"algorithms": list(algorithms), "grid": grid}
