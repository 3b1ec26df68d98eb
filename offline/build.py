"""Step `build`: every step whose outputs are missing or stale, in order.

Stale means made from something else than what is there now (``offline.provenance``): a step
reruns when an input artefact's content differs from what its step manifest recorded, whichever
command rewrote that input (``build``, a step's own command, or a hand-copied file). Each rerun
says why.

Recipes: a step the build made reruns when the build's recipe for it changed (``build --subset``
after a full build). A step made on purpose by its own command (``train-backbone --epochs 1``,
``import-backbone resnet50``, ``data --source image-folder``) is kept while its inputs are
unchanged, whatever recipe it used: the build says so, and the steps after it rerun if they were
made from something else. ``--force`` remakes everything with the build's recipes.

``demo_options`` describes a small, fast build on a subset (``dyce-offline build --subset N``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from dyce.hashing import json_sha256
from dyce.numerics import Precision, choose_numerics

from .bank_builder import ALGORITHMS, Algorithm, build_bank, search_recipe
from .data import data_recipe, prepare_data
from .layout import OfflineLayout
from .provenance import (
    ABSENT,
    BUILD,
    FINGERPRINTS,
    OPTIONAL,
    current_inputs,
    read_step_manifest,
    recipe_changes,
    recipe_dict,
    running_build,
)
from .records import record, record_recipe
from .report import make_report
from .train_backbone import BackboneRecipe, train_backbone
from .train_exits import ExitRecipe, train_exits
from .train_saver import SaverRecipe, train_saver

console = Console(stderr=True)


class BuildOptions(BaseModel):
    model_config = ConfigDict(frozen=True)

    search_size: int = 10_000
    limit: dict[str, int] | None = Field(None, description="keep at most this many samples per split")
    seed: int = 0
    backbone: BackboneRecipe = BackboneRecipe()
    exits: ExitRecipe = ExitRecipe()
    saver: SaverRecipe | None = Field(SaverRecipe(), description="None: no saver stage (TinySaver)")
    algorithms: tuple[Algorithm, ...] = ALGORITHMS
    grid: Literal["adaptive", "uniform"] = "adaptive"
    device: str | None = Field(None, description="cpu | cuda[:N]; None: CUDA when available")

    def with_precision(self, precision: Precision) -> BuildOptions:
        """Both training steps under one numerics setting (``build --precision``)."""
        return self.model_copy(
            update={
                "backbone": self.backbone.model_copy(update={"precision": precision}),
                "exits": self.exits.model_copy(update={"precision": precision}),
                "saver": self.saver and self.saver.model_copy(update={"precision": precision}),
            }
        )


@dataclass(frozen=True)
class Step:
    name: str
    outputs: list[Path]
    inputs: tuple[str, ...]  # artefact fingerprints it reads (offline.provenance.FINGERPRINTS)
    recipe: dict[str, Any]
    run: Callable[[], object]


def steps(layout: OfflineLayout, options: BuildOptions) -> list[Step]:
    """Every step in order: what it makes, what it reads, its recipe, how to run it."""
    data = data_recipe(search_size=options.search_size, seed=options.seed, limit=options.limit)
    search = search_recipe(options.algorithms, options.grid)
    saver = options.saver
    return [
        Step(
            "data",
            [layout.data_manifest, layout.splits],
            (),
            data,
            lambda: prepare_data(layout, search_size=options.search_size, seed=options.seed, limit=options.limit),
        ),
        Step(
            "train-backbone",
            [layout.backbone_manifest, layout.backbone_weights],
            ("splits",),
            recipe_dict(options.backbone),
            lambda: train_backbone(layout, options.backbone, device=options.device),
        ),
        Step(
            "train-exits",
            [layout.exits_manifest, layout.exits_weights],
            ("splits", "backbone"),
            recipe_dict(options.exits),
            lambda: train_exits(layout, options.exits, device=options.device),
        ),
        *(
            [
                Step(
                    "train-saver",
                    [layout.savers_manifest, layout.savers_weights],
                    ("splits", "backbone"),
                    recipe_dict(saver),
                    lambda: train_saver(layout, saver, device=options.device),
                )
            ]
            if saver
            else []
        ),
        Step(
            "record",
            [layout.records_manifest, layout.records],
            ("splits", "backbone", "exits", "savers") if saver else ("splits", "backbone", "exits"),
            record_recipe(saver is not None),
            lambda: record(layout, device=options.device, savers=saver is not None),
        ),
        Step(
            "search",
            [layout.bank],
            ("records",),
            search,
            lambda: build_bank(layout, options.algorithms, options.grid),
        ),
        Step(
            "report",
            [layout.report_json, layout.report_png],
            ("records", "bank"),
            {},
            lambda: make_report(layout),
        ),
    ]


def why_rerun(layout: OfflineLayout, step: Step) -> tuple[str | None, str]:
    """(why ``step`` must run or None, a note on why it is kept)."""
    missing = [p.name for p in step.outputs if not p.is_file()]
    if missing:
        return f"missing {', '.join(missing)}", ""
    manifest = read_step_manifest(layout, step.name)
    if manifest is None:
        return "no record of what its outputs were made from", ""
    # The inputs its producer read: an imported backbone depends on no split, a trained one does.
    read = tuple(name for name in manifest.inputs if name in FINGERPRINTS)
    read += tuple(name for name in step.inputs if name in OPTIONAL and name not in read)
    now = current_inputs(layout, read)
    changed = [name for name in read if manifest.inputs.get(name, ABSENT) != now[name]]
    if changed:
        return f"{', '.join(changed)} changed since it ran", ""
    if manifest.recipe_sha256 == json_sha256(step.recipe):
        return None, ""
    changes = "; ".join(recipe_changes(manifest.recipe, step.recipe)) or "other settings"
    if manifest.command == BUILD:
        return f"recipe changed ({changes})", ""
    return None, f"kept: made by `dyce-offline {manifest.command}` with another recipe than the build's ({changes})"


def build(layout: OfflineLayout, options: BuildOptions | None = None, force: bool = False) -> list[str]:
    """Run the stale steps; returns the names of the steps that ran. Writes each step's time and
    the chosen numerics into ``report.json`` (``build``)."""
    options = options or BuildOptions()
    ran: list[str] = []
    seconds: dict[str, float] = {}
    plan = steps(layout, options)
    trained = [("train-backbone", options.backbone), ("train-exits", options.exits), ("train-saver", options.saver)]
    for name, precision in ((name, recipe.precision) for name, recipe in trained if recipe is not None):
        console.print(f"[dim]{name} numerics: {choose_numerics(precision, options.device).describe()}[/dim]")
    for i, step in enumerate(plan):
        reason, note = ("--force", "") if force else why_rerun(layout, step)
        if reason is None:
            console.print(f"[dim]{step.name}: up to date ({step.outputs[0]}){'; ' + note if note else ''}[/dim]")
            continue
        console.print(f"[bold]{step.name}[/bold] ({i + 1}/{len(plan)}) runs: {reason}")
        start = time.perf_counter()
        with running_build():
            step.run()
        seconds[step.name] = round(time.perf_counter() - start, 1)
        console.print(f"  {step.name} done in {seconds[step.name]:.1f} s")
        ran.append(step.name)
    if ran and layout.report_json.is_file():
        _record_build(layout, seconds)
    return ran


def _record_build(layout: OfflineLayout, seconds: dict[str, float]) -> None:
    report = json.loads(layout.report_json.read_text())
    report["build"] = {
        "step_seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    layout.report_json.write_text(json.dumps(report, indent=1))
    from .report import markdown_table

    layout.report_md.write_text(markdown_table(report))


def demo_options(
    subset: int = 2000,
    epochs: int = 2,
    exit_kinds: tuple[str, ...] = ("mlp1", "mlp3x500"),
    exit_epochs: int = 3,
    saver_epochs: int = 10,
    algorithms: tuple[Algorithm, ...] = ALGORITHMS,
) -> BuildOptions:
    return BuildOptions(
        search_size=max(subset // 2, 1),
        limit={"exit_train": subset, "search": max(subset // 2, 1), "test": max(subset // 2, 1)},
        # Small batches and a gentle peak rate: a few dozen steps must still settle BatchNorm's statistics.
        backbone=BackboneRecipe(epochs=epochs, batch_size=64, max_lr=0.05),
        exits=ExitRecipe(kinds=exit_kinds, epochs=exit_epochs),
        # Small batches, as for the backbone: a few hundred images must still make enough steps.
        saver=SaverRecipe(epochs=saver_epochs, batch_size=64) if saver_epochs else None,
        algorithms=algorithms,
        grid="uniform",
    )
