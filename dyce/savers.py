"""Savers (TinySaver): small independent classifiers that see the raw input and may answer before
the backbone runs at all.

A saver is attached as an exit at an extra position in front of the backbone: the model it
serves has an identity "segment" 0 (costing nothing) whose output is the input image, the
savers are the candidate exits of that position, and backbone position ``n`` becomes position
``n + 1``. The exit rule, the simulation, the searches, the executor and the pipeline then treat
the saver like any other exit, without a line of saver-specific logic; only the naming of
positions at the edges (metrics, responses) knows the difference (``position_offset``).

Architectures come from a registry, torchvision-style: one builder per kind, taking the input's
spec (channels and size) and the number of classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn
from torchvision import models

from .backbones import SegmentedModel
from .backbones._segmented import InputSpec
from .exits import ExitSet, ExitSpec

SaverBuilder = Callable[[InputSpec, int], nn.Module]  # (input spec, num_classes) -> image -> logits

SAVER_POSITION = 0  # where savers sit in a model with a saver stage
SAVER_LABEL = "saver"


def strided_cnn(input_spec: InputSpec, num_classes: int, widths: Sequence[int]) -> nn.Module:
    """3x3 stride-2 convolutions with batch norm, global average pooling and a linear read-out:
    every layer quarters the pixels, so the first (widest-image) layer stays the cheap one."""
    layers: list[nn.Module] = []
    channels = input_spec.channels
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU(inplace=True))
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


def small_mobilenet(input_spec: InputSpec, num_classes: int, width_mult: float) -> nn.Module:
    """torchvision's MobileNetV3-Small at a reduced width. Its stem takes the input's channels,
    and on small images (under 64 px) it keeps stride 1, or the 32x downsampling would leave
    nothing to classify on a 28x28 image."""
    model = models.mobilenet_v3_small(num_classes=num_classes, width_mult=width_mult)
    stem = model.features[0][0]
    stride = 1 if min(input_spec.height, input_spec.width) < 64 else 2
    model.features[0][0] = nn.Conv2d(input_spec.channels, stem.out_channels, 3, stride=stride, padding=1, bias=False)
    return model


_SAVER_KINDS: dict[str, SaverBuilder] = {
    "cnn_small": lambda spec, classes: strided_cnn(spec, classes, (16, 32, 64)),
    "cnn_wide": lambda spec, classes: strided_cnn(spec, classes, (32, 64, 128)),
    "mobilenet_v3_small_050": lambda spec, classes: small_mobilenet(spec, classes, 0.5),
}


def register_saver_kind(kind: str, builder: SaverBuilder) -> None:
    """Make a user saver architecture buildable by name (so saved savers can be reloaded)."""
    if kind in _SAVER_KINDS:
        raise ValueError(f"saver kind {kind!r} is already registered")
    _SAVER_KINDS[kind] = builder


def list_saver_kinds() -> list[str]:
    return sorted(_SAVER_KINDS)


def build_saver(kind: str, input_spec: InputSpec, num_classes: int) -> nn.Module:
    try:
        builder = _SAVER_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown saver kind {kind!r}; known: {', '.join(list_saver_kinds())}") from None
    return builder(input_spec, num_classes)


def with_saver_stage(backbone: SegmentedModel) -> SegmentedModel:
    """The same backbone (same module objects, same weights) with an identity segment in front:
    position 0 is the input itself, where savers attach."""
    return SegmentedModel(
        backbone.name,
        backbone.model,
        [nn.Identity(), *backbone.segments],
        backbone.head,
        backbone.input_spec,
        backbone.num_classes,
    ).train(backbone.training)


def attach_savers(
    backbone: SegmentedModel, exits: ExitSet, savers: Sequence[nn.Module], kinds: Sequence[str]
) -> tuple[SegmentedModel, ExitSet]:
    """The backbone with a saver stage and one exit set: ``savers`` (candidates 1, 2, ... in
    order) at position 0 and every backbone exit one position later."""
    if len(savers) != len(kinds) or not savers:
        raise ValueError("one kind per saver, and at least one saver, are required")
    staged = with_saver_stage(backbone)
    spec = backbone.input_spec
    specs = [ExitSpec(SAVER_POSITION, k + 1, kind, spec.channels, backbone.num_classes) for k, kind in enumerate(kinds)]
    modules = list(savers)
    for exit_spec in exits.all_specs():
        specs.append(replace(exit_spec, position=exit_spec.position + position_offset(True)))
        modules.append(exits.exit(exit_spec.position, exit_spec.index))
    return staged, ExitSet(staged.num_positions, specs, modules)


def position_offset(saver_stage: bool) -> int:
    """How far a saver stage shifts the backbone's positions: run-time position = backbone
    position + offset, so the saver (run-time 0) is backbone position -1."""
    return 1 if saver_stage else 0


def backbone_position_label(position: int) -> str:
    """A backbone position as metrics name it: its number whether or not a saver stage is in
    front (dashboards stay comparable across banks), "saver" for the saver (-1)."""
    return SAVER_LABEL if position < 0 else str(position)
