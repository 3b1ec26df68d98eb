"""ConvNeXt family: one segment per CNBlock; the stem and each downsampling layer ride with
the block that follows them. Head: avgpool + torchvision's classifier (LayerNorm2d, Linear)."""

from __future__ import annotations

from torch import nn
from torchvision import models

from ._segmented import InputSpec, SegmentedModel
from .registry import load_torchvision, register_backbone


def segment_convnext(name: str, model: models.ConvNeXt, input_spec: InputSpec) -> SegmentedModel:
    segments: list[nn.Module] = []
    pending: list[nn.Module] = []  # stem / downsampling layers waiting for the next block
    for stage in model.features:
        is_block_stage = isinstance(stage, nn.Sequential) and all(isinstance(m, models.convnext.CNBlock) for m in stage)
        if not is_block_stage:
            pending.append(stage)
            continue
        for block in stage:
            segments.append(nn.Sequential(*pending, block) if pending else block)
            pending = []
    head = nn.Sequential(model.avgpool, model.classifier)
    return SegmentedModel(name, model, segments, head, input_spec, model.classifier[-1].out_features)


def _builder(arch: str):
    def build(weights=None, num_classes: int | None = None) -> SegmentedModel:
        return segment_convnext(arch, load_torchvision(arch, weights, num_classes), InputSpec(3, 224, 224))

    build.__name__ = arch
    return build


for _arch in ("convnext_tiny", "convnext_small", "convnext_base"):
    register_backbone(_arch, family="convnext")(_builder(_arch))
