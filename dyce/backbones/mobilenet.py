"""MobileNetV3 and EfficientNet: one segment per ``features`` block; the head is
avgpool + flatten + torchvision's classifier."""

from __future__ import annotations

from torch import nn

from ._segmented import InputSpec, SegmentedModel
from .registry import load_torchvision, register_backbone


def segment_features_classifier(name: str, model: nn.Module, input_spec: InputSpec) -> SegmentedModel:
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    num_classes = model.classifier[-1].out_features
    return SegmentedModel(name, model, list(model.features), head, input_spec, num_classes)


def _builder(arch: str, family: str):
    def build(weights=None, num_classes: int | None = None) -> SegmentedModel:
        model = load_torchvision(arch, weights, num_classes)
        return segment_features_classifier(arch, model, InputSpec(3, 224, 224))

    build.__name__ = arch
    register_backbone(arch, family=family)(build)


_builder("mobilenet_v3_large", "mobilenet")
_builder("mobilenet_v3_small", "mobilenet")
_builder("efficientnet_b0", "efficientnet")
