"""On-disk layout of trained artefacts, shared by the offline toolchain (writer) and the
service (reader). Weights are safetensors; identities are JSON validated by pydantic.

    <root>/backbone.json        BackboneManifest (identity, labels, preprocessing)
    <root>/backbone.safetensors backbone weights (the torchvision model's state_dict)
    <root>/exits.json           ExitManifest (every candidate exit's spec and hash)
    <root>/exits.safetensors    all candidate exits' weights, keys "<position>.<index>.<param>"
    <root>/bank.json            Bank (configurations)
    <root>/profile.json         LatencyProfile (optional: measured time of every part)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from .backbones import SegmentedModel, build_backbone
from .bank import BackboneIdentity, Bank, ExitIdentity
from .exits import ExitSet, ExitSpec, build_exit
from .hashing import state_dict_sha256
from .preprocess import PreprocessSpec


class ArtifactLayout:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    backbone_manifest = property(lambda self: self.root / "backbone.json")
    backbone_weights = property(lambda self: self.root / "backbone.safetensors")
    exits_manifest = property(lambda self: self.root / "exits.json")
    exits_weights = property(lambda self: self.root / "exits.safetensors")
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
        for key, value in module.state_dict().items():
            tensors[f"{spec.position}.{spec.index}.{key}"] = value.detach().cpu().contiguous()
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
        prefix = f"{entry.position}.{entry.index}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if state_dict_sha256(module) != entry.sha256:
            raise ValueError(f"exit ({entry.position}, {entry.index}) weights do not match their manifest hash")
        modules.append(module.eval())
    return ExitSet(manifest.num_positions, [e.spec for e in manifest.exits], modules), manifest


def load_bank_for(layout: ArtifactLayout, bank_path: str | Path | None = None) -> Bank:
    """Load a bank and check that it was searched for the artefacts in ``layout``."""
    bank = Bank.load(bank_path or layout.bank)
    backbone = BackboneManifest.model_validate_json(layout.backbone_manifest.read_text())
    exits = ExitManifest.model_validate_json(layout.exits_manifest.read_text())
    bank.check_matches(backbone.identity, exits.identities())
    return bank
