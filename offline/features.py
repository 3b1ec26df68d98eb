"""One pass of the frozen backbone over a dataset, handing every batch's segment outputs to the
caller: shared by exit training (pooled-feature cache) and recording (every exit's output)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from dyce.backbones import SegmentedModel
from dyce.hashing import json_sha256

from .layout import OfflineLayout
from .loading import batches, num_batches
from .provenance import current_inputs

BatchHook = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def backbone_pass(
    backbone: SegmentedModel,
    dataset: Dataset,
    hook: BatchHook,
    batch_size: int = 500,
    desc: str = "backbone pass",
    device: str | None = None,
) -> None:
    """``hook(position_outputs, final_logits, labels)`` for every batch, in dataset order, all on
    ``device`` (default: the backbone's), in fp32 as the service runs it."""
    backbone.eval()
    device = device or str(next(backbone.parameters()).device)
    total = num_batches(dataset, batch_size)
    for images, labels in tqdm(batches(dataset, batch_size, device), total=total, desc=desc, leave=False):
        x = images.contiguous(memory_format=torch.channels_last)
        outputs = []
        for segment in backbone.segments:
            x = segment(x)
            outputs.append(x)
        hook(outputs, backbone.head(x), labels)


def teacher_key(layout: OfflineLayout) -> str:
    """What the teacher's outputs depend on: the splits and the backbone, by content."""
    return json_sha256(current_inputs(layout, ("splits", "backbone")))


def save_teacher(layout: OfflineLayout, probabilities: torch.Tensor) -> None:
    """Keep the backbone's softmax on the exit-train split for the next distillation step."""
    save_file(
        {"probabilities": probabilities.float().cpu().contiguous()}, str(layout.teacher), {"key": teacher_key(layout)}
    )


def cached_teacher(layout: OfflineLayout) -> torch.Tensor | None:
    """The kept softmax when it was computed from the splits and backbone as they are now."""
    if not layout.teacher.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(layout.teacher), "pt") as cache:  # one read: the key, then the tensor
        if (cache.metadata() or {}).get("key") != teacher_key(layout):
            return None
        return cache.get_tensor("probabilities")


def teacher_probabilities(layout: OfflineLayout, backbone: SegmentedModel, dataset: Dataset) -> torch.Tensor:
    """The backbone's softmax over ``dataset`` (the exit-train split), from the cache if current."""
    cached = cached_teacher(layout)
    if cached is not None and len(cached) == len(dataset):  # type: ignore[arg-type]
        return cached
    parts: list[torch.Tensor] = []
    backbone_pass(
        backbone,
        dataset,
        lambda _, logits, __: parts.append(torch.softmax(logits.float(), 1).cpu()),
        desc="teacher outputs",
    )
    probabilities = torch.cat(parts)
    save_teacher(layout, probabilities)
    return probabilities
