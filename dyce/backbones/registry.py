"""Backbone registry, in the style of torchvision's ``models``: one builder per variant."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torchvision import models

from ._segmented import SegmentedModel


class BackboneBuilder(Protocol):
    def __call__(self, weights: Any = None, num_classes: int | None = None) -> SegmentedModel: ...


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    family: str
    builder: BackboneBuilder


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, family: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = BackboneEntry(name, family, builder)
        return builder

    return decorate


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, weights: Any = None, num_classes: int | None = None) -> SegmentedModel:
    """Build a registered backbone, split into segments, in eval mode.

    ``weights``: ``None`` (random init), anything torchvision's weights API accepts
    (``"DEFAULT"``, ``"IMAGENET1K_V2"``, a ``WeightsEnum`` member), or the path of a local
    state_dict file (``.pt``/``.pth``/``.safetensors``).
    """
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None
    return entry.builder(weights=weights, num_classes=num_classes).eval()


def is_local_weights(weights: Any) -> bool:
    return isinstance(weights, Path) or (
        isinstance(weights, str) and (Path(weights).suffix in {".pt", ".pth", ".safetensors"} or "/" in weights)
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept checkpoints that wrap the weights, as many training scripts save them.
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_torchvision(arch: str, weights: Any, num_classes: int | None) -> nn.Module:
    """The torchvision model ``arch`` with weights from torchvision's API or a local file."""
    if weights is not None and is_local_weights(weights):
        state = load_state_dict_file(weights)
        if num_classes is None:
            # The classifier's last weight matrix tells how many classes the file was trained for.
            num_classes = int(next(v for k, v in reversed(state.items()) if k.endswith("weight")).shape[0])
        model = models.get_model(arch, weights=None, num_classes=num_classes)
        model.load_state_dict(state)
        return model
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return models.get_model(arch, weights=weights, **kwargs)
