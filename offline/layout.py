"""Where the offline steps keep their outputs: the shared artefacts (backbone, exits, bank,
read by the service through ``dyce.artifacts``) plus the toolchain's own intermediate files."""

from __future__ import annotations

import os
from pathlib import Path

from dyce.artifacts import ArtifactLayout

DEFAULT_ROOT = Path("artifacts")


def default_root() -> Path:
    return Path(os.environ.get("DYCE_ARTIFACTS_DIR", DEFAULT_ROOT))


class OfflineLayout(ArtifactLayout):
    data_manifest = property(lambda self: self.root / "data.json")
    splits = property(lambda self: self.root / "splits.npz")
    backbone_training = property(lambda self: self.root / "backbone_training.json")
    exit_training = property(lambda self: self.root / "exit_training.json")
    saver_training = property(lambda self: self.root / "saver_training.json")
    # The backbone's softmax on the exit-train split: both exit and saver training distil from it.
    teacher = property(lambda self: self.root / "teacher.safetensors")
    bank_without_saver = property(lambda self: self.root / "bank-without-saver.json")
    records_manifest = property(lambda self: self.root / "records.json")
    records = property(lambda self: self.root / "records.npz")
    search_runs = property(lambda self: self.root / "search.json")
    report_json = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    report_png = property(lambda self: self.root / "report.png")
