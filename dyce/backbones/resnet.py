"""ResNet family: one segment per residual block (paper Sec. VI: 16 for resnet34/50, 50 for
resnet152); the stem rides with the first block, the head is avgpool + flatten + fc."""

from __future__ import annotations

from torch import nn
from torchvision import models

from ._segmented import InputSpec, SegmentedModel
from .registry import BackboneBuilder, load_torchvision, register_backbone


def segment_resnet(name: str, model: models.ResNet, input_spec: InputSpec) -> SegmentedModel:
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    segments: list[nn.Module] = [nn.Sequential(stem, blocks[0]), *blocks[1:]]
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return SegmentedModel(name, model, segments, head, input_spec, model.fc.out_features)


def _imagenet_resnet(arch: str) -> BackboneBuilder:
    def build(weights=None, num_classes: int | None = None) -> SegmentedModel:
        model = load_torchvision(arch, weights, num_classes)
        return segment_resnet(arch, model, InputSpec(3, 224, 224))

    build.__name__ = arch
    return build


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_backbone(_arch, family="resnet")(_imagenet_resnet(_arch))


@register_backbone("resnet18_fmnist", family="resnet")
def resnet18_fmnist(weights=None, num_classes: int | None = None) -> SegmentedModel:
    """The demo variant: torchvision's ResNet-18 for 1x28x28 grey images (Fashion-MNIST).

    Only the first convolution changes, to take one input channel (same 7x7/2 geometry); every
    block, the head and the segmentation stay torchvision's. At 28x28 it costs ~28 MMACs, cheap
    enough to train on a 2-core CPU in minutes.
    ``weights`` may only be a local state_dict here (no published weights exist for it).
    """
    model = models.resnet18(num_classes=num_classes or 10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if weights is not None:
        from .registry import load_state_dict_file

        model.load_state_dict(load_state_dict_file(weights))
    return segment_resnet("resnet18_fmnist", model, InputSpec(1, 28, 28))
