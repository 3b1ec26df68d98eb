"""How raw images become backbone inputs: the backbone's own transforms, stored with it."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torchvision.transforms import v2


class PreprocessSpec(BaseModel):
    """Resize (shorter side), centre crop, scale to [0, 1], normalise; grey or RGB."""

    model_config = ConfigDict(frozen=True)

    channels: int
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_torchvision_weights(cls, weights: Any) -> PreprocessSpec:
        """Read the parameters of a torchvision weights enum's ``transforms()`` preset."""
        preset = weights.transforms()
        return cls(
            channels=3,
            resize=int(preset.resize_size[0]),
            crop=int(preset.crop_size[0]),
            mean=tuple(preset.mean),
            std=tuple(preset.std),
            interpolation=preset.interpolation.value,
        )

    @property
    def pil_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def transform(self) -> v2.Compose:
        """PIL image (any mode) -> normalised float tensor (C, crop, crop)."""
        return v2.Compose(
            [
                v2.Lambda(lambda img: img.convert(self.pil_mode) if img.mode != self.pil_mode else img),
                v2.PILToTensor(),
                v2.Resize(self.resize, interpolation=v2.InterpolationMode(self.interpolation), antialias=True),
                v2.CenterCrop(self.crop),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )


IMAGENET = PreprocessSpec(channels=3, resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
FASHION_MNIST = PreprocessSpec(channels=1, resize=28, crop=28, mean=(0.2860,), std=(0.3530,))
