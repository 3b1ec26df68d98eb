"""Batches of a split on the device that trains or records.

In-memory splits (Fashion-MNIST, a ``TensorDataset``) move to the device once and are sliced
there: no per-sample ``__getitem__`` and collate, no host-to-device copy per batch. Decoded
splits (ImageFolder: JPEG decoding and resizing dominate) go through a ``DataLoader`` with worker
processes, and with pinned memory when the device is a GPU (asynchronous copies).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def loader_workers() -> int:
    """Worker processes for decoded data: every core but one for the training process itself,
    at most 8 (beyond that JPEG decoding of one batch is no longer the bottleneck)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def batches(
    dataset: Dataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches on ``device``, in order or shuffled by ``generator`` (CPU)."""
    device = torch.device(device)
    if isinstance(dataset, TensorDataset):
        images, labels = (t.to(device) for t in dataset.tensors[:2])
        m = len(labels)
        order = torch.randperm(m, generator=generator) if shuffle else None
        stop = m - m % batch_size if drop_last else m
        for start in range(0, stop, batch_size):
            if order is None:
                yield images[start : start + batch_size], labels[start : start + batch_size]
            else:
                idx = order[start : start + batch_size].to(device)
                yield images.index_select(0, idx), labels.index_select(0, idx)
        return
    workers = loader_workers()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def num_batches(dataset: Dataset, batch_size: int, drop_last: bool = False) -> int:
    m = len(dataset)  # type: ignore[arg-type]
    return m // batch_size if drop_last else -(-m // batch_size)
