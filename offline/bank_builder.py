"""Step `search`: run the configuration searches on the search split's records and write the
bank (``dyce.bank.Bank``, ``<artifacts>/bank.json``) that the service loads.

Every configuration's figures (on search and on test) come from ``dyce.simulate.simulate``,
the rule shared with the runtime, never from the searches' own bookkeeping. Entries that
another entry Pareto-dominates on the search split (at least as accurate and no more MACs,
one of them strictly) and repeats of an earlier entry's figures are kept, marked
``dominated``.

With savers in the records (``dyce.savers``: position 0 is the saver stage), the searches choose
per lambda whether to use a saver like any exit; the same searches without the saver stage write
``bank-without-saver.json``, a bank for the same backbone and exits that the report compares.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import BaseModel

from dyce.bank import Bank, BankEntry, CostBasis, SplitMetrics
from dyce.config import ExitConfiguration
from dyce.hashing import file_sha256
from dyce.macs import MacTable
from dyce.profile import LatencyProfile
from dyce.simulate import ExitRecords, simulate

from .layout import OfflineLayout
from .objective import SearchProblem
from .provenance import current_inputs, write_step_manifest
from .records import RecordsManifest, load_records
from .search import UNIFORM_GRID, adaptive_grid, baseline, iterative, single_pass

Algorithm = Literal["iterative", "single_pass", "baseline"]
ALGORITHMS: tuple[Algorithm, ...] = ("iterative", "single_pass", "baseline")


class SearchRun(BaseModel):
    algorithm: str
    grid: str
    lambdas: int
    distinct_configurations: int
    seconds: float


def metrics(
    records: ExitRecords, config: ExitConfiguration, macs: MacTable, time_table: MacTable | None = None
) -> SplitMetrics:
    """Simulated figures; with a measured-time table, the relative time as well as the MACs."""
    result = simulate(records, config, macs)
    return SplitMetrics(
        accuracy=result.accuracy,
        relative_accuracy=result.relative_accuracy,
        relative_macs=result.relative_macs,
        exit_rates=tuple(float(r) for r in result.exit_rates),
        relative_latency=None if time_table is None else simulate(records, config, time_table).relative_macs,
    )


def mark_dominated(entries: list[BankEntry]) -> list[BankEntry]:
    """On the cost the search traded against (MACs, or measured time for a latency bank)."""
    points = np.array([(e.search.accuracy, e.search.relative_cost) for e in entries])
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


def latency_basis(layout: OfflineLayout, backbone_sha256: str, batch: int) -> CostBasis:
    """The measured-time cost table of ``<artifacts>/profile.json`` at the serving batch."""
    if not layout.profile.is_file():
        raise FileNotFoundError(f"{layout.profile} is missing: run `dyce-offline profile` first")
    profile = LatencyProfile.model_validate_json(layout.profile.read_text())
    if profile.backbone_sha256 != backbone_sha256:
        raise ValueError(f"{layout.profile} was measured on other backbone weights: run `dyce-offline profile` again")
    return CostBasis(
        kind="latency",
        where=profile.where,
        batch=profile.buckets[profile.bucket_index(batch)],
        profile_sha256=file_sha256(layout.profile),
        table=profile.cost_table(batch),
    )


def without_saver_stage(records: ExitRecords) -> ExitRecords:
    return ExitRecords(records.confidence[1:], records.correct[1:], tuple(records.num_candidates[1:]))


def table_without_saver_stage(table: MacTable) -> MacTable:
    return MacTable(segment_macs=table.segment_macs[1:], head_macs=table.head_macs, exit_macs=table.exit_macs[1:])


def build_bank(
    layout: OfflineLayout,
    algorithms: tuple[Algorithm, ...] = ALGORITHMS,
    grid: Literal["adaptive", "uniform"] = "adaptive",
    progress: bool = True,
    cost: Literal["macs", "latency"] = "macs",
    batch: int = 32,
) -> tuple[Bank, list[SearchRun]]:
    """``cost="latency"``: search on the measured time of ``profile.json`` at ``batch`` images per
    step (the server's full batches) instead of MACs; entries keep their relative MACs too."""
    inputs = current_inputs(layout, ("records", "profile") if cost == "latency" else ("records",))
    manifest, records = load_records(layout)
    basis = latency_basis(layout, manifest.backbone.weights_sha256, batch) if cost == "latency" else CostBasis()
    if basis.table is not None and basis.table.num_positions != manifest.macs.num_positions:
        stage = "with" if manifest.savers else "without"
        raise ValueError(
            f"{layout.profile} was timed on another model than the records ({stage} a saver stage): "
            "run `dyce-offline profile` again"
        )
    bank, runs = search_bank(manifest, records, algorithms, grid, basis, progress)
    bank.save(layout.bank)
    if manifest.savers:
        plain = manifest.model_copy(
            update={
                "savers": (),
                "num_candidates": manifest.num_candidates[1:],
                "macs": table_without_saver_stage(manifest.macs),
            }
        )
        plain_records = {split: without_saver_stage(r) for split, r in records.items()}
        if basis.table is not None:
            basis = basis.model_copy(update={"table": table_without_saver_stage(basis.table)})
        search_bank(plain, plain_records, algorithms, grid, basis, progress)[0].save(layout.bank_without_saver)
    else:
        layout.bank_without_saver.unlink(missing_ok=True)
    layout.search_runs.write_text("[\n" + ",\n".join(run.model_dump_json() for run in runs) + "\n]\n")
    write_step_manifest(layout, "search", "search", search_recipe(algorithms, grid, cost, batch), inputs)
    return bank, runs


def search_bank(
    manifest: RecordsManifest,
    records: dict[str, ExitRecords],
    algorithms: tuple[Algorithm, ...],
    grid: Literal["adaptive", "uniform"],
    basis: CostBasis,
    progress: bool,
) -> tuple[Bank, list[SearchRun]]:
    problem = SearchProblem(records["search"], basis.table or manifest.macs)
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
                    search=metrics(records["search"], config, manifest.macs, basis.table),
                    test=metrics(records["test"], config, manifest.macs, basis.table) if "test" in records else None,
                )
            )
    bank = Bank(
        backbone=manifest.backbone,
        exits=manifest.exits,
        num_candidates=manifest.num_candidates,
        macs=manifest.macs,
        original_accuracy={split: r.original_accuracy for split, r in records.items()},
        entries=tuple(mark_dominated(entries)),
        cost=basis,
        savers=manifest.savers,
    )
    return bank, runs


def search_recipe(algorithms: tuple[str, ...], grid: str, cost: str = "macs", batch: int = 32) -> dict:
    recipe = {"algorithms": list(algorithms), "grid": grid}
    # A MAC search's recipe stays what it was, so banks built before the latency option are not stale.
    return recipe if cost == "macs" else recipe | {"cost": cost, "batch": batch}
