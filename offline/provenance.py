"""What each step was made from: staleness by content, not by file existence or dates.

Every step, whichever command runs it (``build`` or the step's own command), writes a step
manifest ``<root>/steps/<step>.json``: the command that produced the step's outputs (``build``
or the step's own command), its recipe, and the content hash of each input artefact as it was
when the step ran. ``build`` compares those with the artefacts as they are now (``offline.build``),
so a backbone retrained by hand makes the exits, records, bank and report rerun.

Artefact fingerprints hash content, never file dates: the splits' index arrays, the backbone's
and the exits' manifests and weights files, the records' arrays, the bank's JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from dyce.hashing import arrays_sha256, file_sha256, json_sha256

from .layout import OfflineLayout

STEP_MANIFEST_VERSION = 1
BUILD = "build"

# Set while ``build`` runs the steps: their manifests then say the build made them (and may
# remake them when its recipe changes), not that a user ran the step's command on purpose.
_running_build: ContextVar[bool] = ContextVar("running_build", default=False)


@contextmanager
def running_build() -> Iterator[None]:
    token = _running_build.set(True)
    try:
        yield
    finally:
        _running_build.reset(token)


class StepManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int = STEP_MANIFEST_VERSION
    step: str
    command: str
    recipe: dict[str, Any]
    recipe_sha256: str
    inputs: dict[str, str]


def _npz_sha256(path: Path) -> str:
    with np.load(path) as data:
        return arrays_sha256({name: data[name] for name in data.files})


def _files_sha256(*parts: str) -> str:
    return json_sha256(list(parts))


def _splits(layout: OfflineLayout) -> str:
    manifest = json.loads(layout.data_manifest.read_text())
    # The splits' meaning: which data, which labels, which indices (not the step's bookkeeping).
    meaning = {k: manifest.get(k) for k in ("source", "path", "labels")}
    return _files_sha256(json_sha256(meaning), _npz_sha256(layout.splits))


FINGERPRINTS: dict[str, tuple[Callable[[OfflineLayout], str], Callable[[OfflineLayout], list[Path]]]] = {
    "splits": (_splits, lambda lay: [lay.data_manifest, lay.splits]),
    "backbone": (
        lambda lay: _files_sha256(file_sha256(lay.backbone_manifest), file_sha256(lay.backbone_weights)),
        lambda lay: [lay.backbone_manifest, lay.backbone_weights],
    ),
    "exits": (
        lambda lay: _files_sha256(file_sha256(lay.exits_manifest), file_sha256(lay.exits_weights)),
        lambda lay: [lay.exits_manifest, lay.exits_weights],
    ),
    "records": (
        lambda lay: _files_sha256(file_sha256(lay.records_manifest), _npz_sha256(lay.records)),
        lambda lay: [lay.records_manifest, lay.records],
    ),
    "bank": (lambda lay: file_sha256(lay.bank), lambda lay: [lay.bank]),
    "profile": (lambda lay: file_sha256(lay.profile), lambda lay: [lay.profile]),
    "savers": (
        lambda lay: _files_sha256(file_sha256(lay.savers_manifest), file_sha256(lay.savers_weights)),
        lambda lay: [lay.savers_manifest, lay.savers_weights],
    ),
}
# Inputs a step reads only when they exist (a build without savers): their absence is a value.
OPTIONAL = {"savers"}
ABSENT = "absent"


def fingerprint(layout: OfflineLayout, artefact: str) -> str | None:
    """Content hash of one artefact as it is now (None when any of its files is missing)."""
    compute, files = FINGERPRINTS[artefact]
    if not all(p.is_file() for p in files(layout)):
        return ABSENT if artefact in OPTIONAL else None
    return compute(layout)


def current_inputs(layout: OfflineLayout, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: fingerprint(layout, name) for name in names}


def step_manifest_path(layout: OfflineLayout, step: str) -> Path:
    return layout.root / "steps" / f"{step}.json"


def recipe_dict(recipe: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    if recipe is None:
        return {}
    return recipe.model_dump(mode="json") if isinstance(recipe, BaseModel) else json.loads(json.dumps(recipe))


def write_step_manifest(
    layout: OfflineLayout,
    step: str,
    command: str,
    recipe: BaseModel | dict[str, Any] | None,
    inputs: dict[str, str | None],
) -> StepManifest:
    """Record what ``step`` was made from; ``inputs`` are fingerprints taken before it ran.
    ``command`` is the step's own command; under ``running_build`` the manifest says ``build``."""
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise FileNotFoundError(f"{step}: input artefacts missing: {', '.join(missing)}")
    recipe_values = recipe_dict(recipe)
    manifest = StepManifest(
        step=step,
        command=BUILD if _running_build.get() and command == step else command,
        recipe=recipe_values,
        recipe_sha256=json_sha256(recipe_values),
        inputs={k: v for k, v in inputs.items() if v is not None},
    )
    path = step_manifest_path(layout, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest.model_dump_json(indent=1))
    return manifest


def read_step_manifest(layout: OfflineLayout, step: str) -> StepManifest | None:
    path = step_manifest_path(layout, step)
    if not path.is_file():
        return None
    try:
        return StepManifest.model_validate_json(path.read_text())
    except ValueError:
        return None  # unreadable: as good as absent, the step reruns


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (for the build's explanation)."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
