"""Measured cost of every part of an early-exit model, on the device and backend that serve it.

MACs (paper Sec. V-A-2) are what the search trades accuracy against by default. On real hardware
time is not proportional to MACs: on a CPU the high-resolution first blocks of a ResNet take more
time per MAC than the deep ones, and on a GPU a small exit head costs a kernel launch whatever
its MACs. A ``LatencyProfile`` times each segment, each candidate exit and the head per batch
bucket through the same ``ExecutionBackend`` the server runs, and turns one bucket into a cost
table in the MAC table's own shape (``cost_table``: nanoseconds per image), so the searches run
unchanged on measured time (``dyce-offline search --cost latency``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from .macs import MacTable
from .timing import median_time

if TYPE_CHECKING:  # the bank imports this module, and the backends import the bank
    from .execution_backends import ExecutionBackend
    from .exits import ExitSet


def host_name(device: str | torch.device) -> str:
    """What the time was measured on: the GPU's name, or the CPU's model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


class Where(BaseModel):
    """The serving set-up a profile belongs to; a bank costed on it is only exact there."""

    model_config = ConfigDict(frozen=True)

    device_type: str
    backend: str
    host: str
    threads: int
    # The torch backend's segments (and any saver) ran rewritten (dyce.segment_rewrites), which
    # changes their time; None: no such rewrites (ONNX Runtime), or profiled before they existed.
    segment_rewrites: bool | None = None
    # The torch backend's layout setting (``DYCE_MEMORY_FORMAT``): "auto" tunes each segment's
    # layout and row grouping on the machine, a fixed layout can run 1.3-5x slower per segment;
    # None: not the torch backend, or profiled before this was recorded.
    memory_format: str | None = None

    def differences(self, other: Where) -> list[str]:
        return [
            f"{field} {getattr(self, field)!r} vs {getattr(other, field)!r}"
            for field in type(self).model_fields
            if getattr(self, field) != getattr(other, field)
        ]


class LatencyProfile(BaseModel):
    """Seconds per *batch* of each part, for each batch bucket (median of timed repeats)."""

    model_config = ConfigDict(frozen=True)

    where: Where
    backbone_sha256: str
    buckets: tuple[int, ...]
    segment_s: tuple[tuple[float, ...], ...] = Field(description="[bucket][position]")
    head_s: tuple[float, ...] = Field(description="[bucket]")
    exit_s: tuple[tuple[tuple[float, ...], ...], ...] = Field(description="[bucket][position][k - 1]")

    def bucket_index(self, batch: int) -> int:
        """The smallest profiled bucket that holds ``batch`` (the largest if none does)."""
        return next((i for i, b in enumerate(self.buckets) if b >= batch), len(self.buckets) - 1)

    def cost_table(self, batch: int) -> MacTable:
        """Nanoseconds per image at the bucket serving ``batch``, shaped like the MAC table so the
        simulation and every search read time where they read MACs."""
        i = self.bucket_index(batch)
        per_image = 1e9 / self.buckets[i]

        def ns(seconds: float) -> int:
            return max(1, round(seconds * per_image))  # 0 would make a part look free

        return MacTable(
            segment_macs=tuple(ns(s) for s in self.segment_s[i]),
            head_macs=ns(self.head_s[i]),
            exit_macs=tuple(tuple(ns(s) for s in position) for position in self.exit_s[i]),
        )

    def per_image_s(self, batch: int) -> float:
        """The plain model's time per image at ``batch`` (every segment and the head)."""
        i = self.bucket_index(batch)
        return (sum(self.segment_s[i]) + self.head_s[i]) / self.buckets[i]


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``max_batch`` (included even when it is not a power of two)."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return (*buckets, max_batch)


@torch.inference_mode()
def measure_latency(
    backend: ExecutionBackend,
    input_shape: Sequence[int],
    exits: ExitSet,
    where: Where,
    backbone_sha256: str,
    buckets: Sequence[int],
    repeats: int = 5,
    progress: Callable[[int], None] | None = None,
) -> LatencyProfile:
    """Time every part through ``backend`` on inputs of each bucket's size.

    Each part runs on the tensor the previous segment produced (real shapes, real memory
    layout), once untimed to warm it up, then ``repeats`` times; the median is kept.
    """

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        return median_time(fn, repeats, backend.device)

    generator = torch.Generator().manual_seed(0)
    segment_s, head_s, exit_s = [], [], []
    last = len(exits.num_candidates) - 1
    for bucket in buckets:
        x = backend.prepare(torch.randn(bucket, *input_shape, generator=generator))
        segments, candidates = [], []
        for n in range(last + 1):
            seconds, x = timed(lambda n=n, x=x: backend.segment(n, x))
            segments.append(seconds)
            if n < last:
                candidates.append(
                    tuple(
                        timed(lambda n=n, k=k, x=x: backend.exit_logits(n, k, x))[0]
                        for k in range(1, exits.num_candidates[n] + 1)
                    )
                )
        head_s.append(timed(lambda x=x: backend.head_logits(x))[0])
        segment_s.append(tuple(segments))
        exit_s.append((*candidates, ()))
        if progress is not None:
            progress(bucket)
    return LatencyProfile(
        where=where,
        backbone_sha256=backbone_sha256,
        buckets=tuple(buckets),
        segment_s=tuple(segment_s),
        head_s=tuple(head_s),
        exit_s=tuple(exit_s),
    )
