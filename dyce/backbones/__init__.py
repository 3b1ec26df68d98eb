"""Registered backbones. Importing this package registers every family."""

from . import convnext, mobilenet, resnet  # noqa: F401  (registration side effects)
from ._segmented import InputSpec, SegmentedModel
from .registry import build_backbone, list_backbones, load_state_dict_file, register_backbone

__all__ = [
    "InputSpec",
    "SegmentedModel",
    "build_backbone",
    "list_backbones",
    "load_state_dict_file",
    "register_backbone",
]
