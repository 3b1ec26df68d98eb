"""Step `build`: every missing step, in order, restarting from the last step whose artefacts
exist (a step that reruns makes every later step rerun, so nothing stale survives).

``demo_options`` describes a small, fast build on a subset (``dyce-offline build --subset N``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from .bank_builder import ALGORITHMS, Algorithm, build_bank
from .data import prepare_data
from .layout import OfflineLayout
from .records import record
from .report import make_report
from .train_backbone import BackboneRecipe, train_backbone
from .train_exits import ExitRecipe, train_exits

console = Console(stderr=True)


class BuildOptions(BaseModel):
    model_config = ConfigDict(frozen=True)

    search_size: int = 10_000
    limit: dict[str, int] | None = Field(None, description="keep at most this many samples per split")
    seed: int = 0
    backbone: BackboneRecipe = BackboneRecipe()
    exits: ExitRecipe = ExitRecipe()
    algorithms: tuple[Algorithm, ...] = ALGORITHMS
    grid: Literal["adaptive", "uniform"] = "adaptive"


def steps(layout: OfflineLayout, options: BuildOptions) -> list[tuple[str, list[Path], Callable[[], object]]]:
    """(name, the files it produces, how to run it), in order."""
    return [
        (
            "data",
            [layout.data_manifest, layout.splits],
            lambda: prepare_data(layout, search_size=options.search_size, seed=options.seed, limit=options.limit),
        ),
        (
            "train-backbone",
            [layout.backbone_manifest, layout.backbone_weights],
            lambda: train_backbone(layout, options.backbone),
        ),
        ("train-exits", [layout.exits_manifest, layout.exits_weights], lambda: train_exits(layout, options.exits)),
        ("record", [layout.records_manifest, layout.records], lambda: record(layout)),
        ("search", [layout.bank], lambda: build_bank(layout, options.algorithms, options.grid)),
        ("report", [layout.report_json, layout.report_png], lambda: make_report(layout)),
    ]


def build(layout: OfflineLayout, options: BuildOptions | None = None, force: bool = False) -> list[str]:
    """Run the missing steps; returns the names of the steps that ran."""
    options = options or BuildOptions()
    ran: list[str] = []
    plan = steps(layout, options)
    for i, (name, outputs, run) in enumerate(plan):
        if not force and not ran and all(p.exists() for p in outputs):
            console.print(f"[dim]{name}: up to date ({outputs[0]})[/dim]")
            continue
        console.print(f"[bold]{name}[/bold] ({i + 1}/{len(plan)})")
        start = time.perf_counter()
        run()
        console.print(f"  {name} done in {time.perf_counter() - start:.1f} s")
        ran.append(name)
    return ran


def demo_options(
    subset: int = 2000,
    epochs: int = 2,
    exit_kinds: tuple[str, ...] = ("mlp1", "mlp3x500"),
    exit_epochs: int = 3,
    algorithms: tuple[Algorithm, ...] = ALGORITHMS,
) -> BuildOptions:
    return BuildOptions(
        search_size=max(subset // 2, 1),
        limit={"exit_train": subset, "search": max(subset // 2, 1), "test": max(subset // 2, 1)},
        # Small batches and a gentle peak rate: a few dozen steps must still settle BatchNorm's statistics.
        backbone=BackboneRecipe(epochs=epochs, batch_size=64, max_lr=0.05),
        exits=ExitRecipe(kinds=exit_kinds, epochs=exit_epochs),
        algorithms=algorithms,
        grid="uniform",
    )
