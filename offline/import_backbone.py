"""Step `import-backbone`: a pre-trained backbone instead of the demo's training (real users).

With torchvision weights (``DEFAULT``, ``IMAGENET1K_V2``, ...) the labels and the preprocessing
come from the weights themselves (their ``meta["categories"]`` and ``transforms()``). With a
local state_dict file the labels are the data split's class names and the preprocessing is
ImageNet's (what torchvision's classifiers are trained with).
"""

from __future__ import annotations

from torchvision import models

from dyce.artifacts import BackboneManifest, save_backbone
from dyce.backbones import build_backbone
from dyce.backbones.registry import is_local_weights
from dyce.hashing import file_sha256
from dyce.preprocess import IMAGENET, PreprocessSpec

from .data import load_manifest
from .layout import OfflineLayout
from .provenance import write_step_manifest


def import_backbone(layout: OfflineLayout, name: str, weights: str) -> BackboneManifest:
    recipe = {"name": name, "weights": str(weights)}
    if is_local_weights(weights):
        # A file's name says nothing about what it holds: record its content.
        recipe["weights_sha256"] = file_sha256(weights)
        labels = list(load_manifest(layout).labels)
        backbone = build_backbone(name, weights=weights, num_classes=len(labels))
        preprocess: PreprocessSpec = IMAGENET
    else:
        available = models.get_model_weights(name)
        enum = available.DEFAULT if weights == "DEFAULT" else available[weights]
        backbone = build_backbone(name, weights=enum)
        labels = list(enum.meta["categories"])
        preprocess = PreprocessSpec.from_torchvision_weights(enum)
    manifest = save_backbone(layout, backbone, labels, preprocess)
    write_step_manifest(layout, "train-backbone", "import-backbone", recipe, {})
    return manifest
