"""One pass of the frozen backbone over a dataset, handing every batch's segment outputs to the
caller: shared by exit training (pooled-feature cache) and recording (every exit's output)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dyce.backbones import SegmentedModel

from .loading import batches, num_batches

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
