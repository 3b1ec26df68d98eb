"""On-disk layout of trained artefacts, shared by the offline toolchain (writer) and the
service (reader). Weights are safetensors; identities are JSON validated by pydantic.

    <root>/backbone.json        BackboneManifest (identity, labels, preprocessing)
    <root>/backbone.safetensors backbone weights (the torchvision model's state_dict)
    <root>/exits.json           ExitManifest (every candidate exit's spec and hash)
    <root>/exits.safetensors    all candidate exits' weights, keys "<position>.<index>.<param>"
    <root>/savers.json          SaverManifest (optional: every candidate saver's kind and hash)
    <root>/savers.safetensors   all savers' weights, keys "<index>.<param>"
    <root>/bank.json            Bank (configurations)
    <root>/profile.json         LatencyProfile (optional: measured time of every part)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import SegmentedModel, build_backbone
from .bank import BackboneIdentity, Bank, BankMismatchError, ExitIdentity, run_time_candidates
from .exits import ExitSet, ExitSpec, build_exit
from .hashing import state_dict_sha256
from .preprocess import PreprocessSpec
from .savers import SAVER_POSITION, attach_savers, build_saver, position_offset


class ArtifactLayout:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    backbone_manifest = property(lambda self: self.root / "backbone.json")
    backbone_weights = property(lambda self: self.root / "backbone.safetensors")
    exits_manifest = property(lambda self: self.root / "exits.json")
    exits_weights = property(lambda self: self.root / "exits.safetensors")
    savers_manifest = property(lambda self: self.root / "savers.json")  # optional
    savers_weights = property(lambda self: self.root / "savers.safetensors")
    bank = property(lambda self: self.root / "bank.json")
    profile = property(lambda self: self.root / "profile.json")  # LatencyProfile, optional


class BackboneManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    identity: BackboneIdentity
    labels: tuple[str, ...]
    preprocess: PreprocessSpec


class ExitEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    position: int
    index: int
    kind: str
    in_channels: int
    num_classes: int
    sha256: str

    @property
    def identity(self) -> ExitIdentity:
        return ExitIdentity(position=self.position, index=self.index, kind=self.kind, sha256=self.sha256)

    @property
    def spec(self) -> ExitSpec:
        return ExitSpec(self.position, self.index, self.kind, self.in_channels, self.num_classes)


class ExitManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    backbone: BackboneIdentity
    num_positions: int
    exits: tuple[ExitEntry, ...]

    def identities(self) -> list[ExitIdentity]:
        return [e.identity for e in self.exits]


class SaverEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    kind: str
    sha256: str

    @property
    def identity(self) -> ExitIdentity:
        return ExitIdentity(position=SAVER_POSITION, index=self.index, kind=self.kind, sha256=self.sha256)


class SaverManifest(BaseModel):
    """Candidate savers, candidates 1, 2, ... of the saver stage, for one backbone's inputs."""

    model_config = ConfigDict(frozen=True)

    backbone: BackboneIdentity
    savers: tuple[SaverEntry, ...]

    def identities(self) -> list[ExitIdentity]:
        return [e.identity for e in self.savers]


def backbone_identity(backbone: SegmentedModel) -> BackboneIdentity:
    return BackboneIdentity(
        name=backbone.name,
        num_classes=backbone.num_classes,
        input_shape=backbone.input_spec.shape,
        weights_sha256=state_dict_sha256(backbone.model),
    )


def save_backbone(
    layout: ArtifactLayout, backbone: SegmentedModel, labels: list[str], preprocess: PreprocessSpec
) -> BackboneManifest:
    layout.root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(layout.backbone_weights))
    manifest = BackboneManifest(identity=backbone_identity(backbone), labels=tuple(labels), preprocess=preprocess)
    layout.backbone_manifest.write_text(manifest.model_dump_json(indent=1))
    return manifest


def load_backbone(layout: ArtifactLayout) -> tuple[SegmentedModel, BackboneManifest]:
    manifest = BackboneManifest.model_validate_json(layout.backbone_manifest.read_text())
    backbone = build_backbone(
        manifest.identity.name, weights=layout.backbone_weights, num_classes=manifest.identity.num_classes
    )
    actual = state_dict_sha256(backbone.model)
    if actual != manifest.identity.weights_sha256:
        raise ValueError(f"{layout.backbone_weights} does not hold the weights its manifest names")
    return backbone, manifest


def save_exits(layout: ArtifactLayout, exits: ExitSet, backbone: BackboneIdentity) -> ExitManifest:
    layout.root.mkdir(parents=True, exist_ok=True)
    tensors, entries = {}, []
    for spec in exits.all_specs():
        module = exits.exit(spec.position, spec.index)
        tensors |= _stored_state(module, f"{spec.position}.{spec.index}.")
        entries.append(ExitEntry(**asdict(spec), sha256=state_dict_sha256(module)))
    save_file(tensors, str(layout.exits_weights))
    manifest = ExitManifest(backbone=backbone, num_positions=exits.num_positions, exits=tuple(entries))
    layout.exits_manifest.write_text(manifest.model_dump_json(indent=1))
    return manifest


def load_exits(layout: ArtifactLayout) -> tuple[ExitSet, ExitManifest]:
    manifest = ExitManifest.model_validate_json(layout.exits_manifest.read_text())
    tensors = load_file(str(layout.exits_weights))
    modules = []
    for entry in manifest.exits:
        module = build_exit(entry.kind, entry.in_channels, entry.num_classes)
        what = f"exit ({entry.position}, {entry.index})"
        modules.append(_load_checked(module, tensors, f"{entry.position}.{entry.index}.", entry.sha256, what))
    return ExitSet(manifest.num_positions, [e.spec for e in manifest.exits], modules), manifest


def save_savers(
    layout: ArtifactLayout, savers: Sequence[nn.Module], kinds: Sequence[str], backbone: BackboneIdentity
) -> SaverManifest:
    layout.root.mkdir(parents=True, exist_ok=True)
    tensors, entries = {}, []
    for index, (saver, kind) in enumerate(zip(savers, kinds, strict=True), start=1):
        tensors |= _stored_state(saver, f"{index}.")
        entries.append(SaverEntry(index=index, kind=kind, sha256=state_dict_sha256(saver)))
    save_file(tensors, str(layout.savers_weights))
    manifest = SaverManifest(backbone=backbone, savers=tuple(entries))
    layout.savers_manifest.write_text(manifest.model_dump_json(indent=1))
    return manifest


def load_savers(layout: ArtifactLayout, backbone: SegmentedModel) -> tuple[list[nn.Module], SaverManifest]:
    manifest = SaverManifest.model_validate_json(layout.savers_manifest.read_text())
    if manifest.backbone != backbone_identity(backbone):
        raise ValueError(f"{layout.savers_manifest} holds savers trained for other backbone weights")
    tensors = load_file(str(layout.savers_weights))
    savers = []
    for entry in manifest.savers:
        saver = build_saver(entry.kind, backbone.input_spec, backbone.num_classes)
        savers.append(_load_checked(saver, tensors, f"{entry.index}.", entry.sha256, f"saver {entry.index}"))
    return savers, manifest


def _stored_state(module: nn.Module, prefix: str) -> dict:
    """``module``'s weights as ``_load_checked`` reads them back, keys under ``prefix``."""
    return {f"{prefix}{key}": value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def _load_checked(module: nn.Module, tensors: dict, prefix: str, sha256: str, what: str) -> nn.Module:
    """``module`` with the weights stored under ``prefix``, refused unless they hash to ``sha256``."""
    module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    if state_dict_sha256(module) != sha256:
        raise ValueError(f"{what} weights do not match their manifest hash")
    return module.eval()


@dataclass(frozen=True)
class LoadedModel:
    """Everything that runs, as one early-exit model: with savers, ``backbone`` has the saver
    stage in front (``dyce.savers``) and ``exits`` holds the savers at position 0."""

    backbone: SegmentedModel
    exits: ExitSet
    backbone_manifest: BackboneManifest
    exit_manifest: ExitManifest
    saver_manifest: SaverManifest | None

    @property
    def saver_stage(self) -> bool:
        return self.saver_manifest is not None

    @property
    def position_offset(self) -> int:
        return position_offset(self.saver_stage)

    def saver_identities(self) -> list[ExitIdentity]:
        return self.saver_manifest.identities() if self.saver_manifest else []

    def exit_hashes(self) -> dict[tuple[int, int], str]:
        """Weights hash of every candidate by its run-time (position, k), savers included."""
        candidates = run_time_candidates(self.exit_manifest.identities(), self.saver_identities())
        return {key: identity.sha256 for key, identity in candidates.items()}

    def with_savers(self, layout: ArtifactLayout) -> LoadedModel:
        """This backbone and its exits with the savers of ``layout`` in front (``dyce.savers``)."""
        savers, manifest = load_savers(layout, self.backbone)
        staged, exits = attach_savers(self.backbone, self.exits, savers, [s.kind for s in manifest.savers])
        return LoadedModel(staged, exits, self.backbone_manifest, self.exit_manifest, manifest)

    def check_bank(self, bank: Bank) -> None:
        """BankMismatchError unless ``bank`` was searched for exactly this model."""
        bank.check_matches(self.backbone_manifest.identity, self.exit_manifest.identities(), self.saver_identities())
        if bank.saver_stage != self.saver_stage:
            searched, loaded = ("with" if stage else "without" for stage in (bank.saver_stage, self.saver_stage))
            raise BankMismatchError(f"bank was searched {searched} a saver stage, the model is loaded {loaded} one")


def load_model(layout: ArtifactLayout, savers: bool | None = None) -> LoadedModel:
    """Backbone and exits, plus the savers when ``savers`` (None: when ``savers.json`` exists)."""
    backbone, backbone_manifest = load_backbone(layout)
    exits, exit_manifest = load_exits(layout)
    model = LoadedModel(backbone, exits, backbone_manifest, exit_manifest, None)
    if savers is None:
        savers = layout.savers_manifest.is_file()
    return model.with_savers(layout) if savers else model


def load_bank_for(layout: ArtifactLayout, bank_path: str | Path | None = None) -> Bank:
    """Load a bank and check that it was searched for the artefacts in ``layout``."""
    bank = Bank.load(bank_path or layout.bank)
    backbone = BackboneManifest.model_validate_json(layout.backbone_manifest.read_text())
    exits = ExitManifest.model_validate_json(layout.exits_manifest.read_text())
    savers = (
        SaverManifest.model_validate_json(layout.savers_manifest.read_text()).identities()
        if bank.saver_stage and layout.savers_manifest.is_file()
        else []
    )
    bank.check_matches(backbone.identity, exits.identities(), savers)
    return bank
