"""Exact rewrites of a frozen backbone's segments for inference, on a copy (the loaded model, its
weight hashes and ONNX exports stay torchvision's modules).

* **Batch-norm folding.** In eval mode a BatchNorm after a convolution is an affine map, so it
  folds into the convolution's weights and bias (torch.fx's ``fuse``): one pass over the
  activations less per convolution, and fewer module calls, which matters most to the small
  batches that early exit leaves at deep positions.
* **Dead-tap cropping.** A backbone runs at one input size, so every convolution sees one
  feature-map size. Where that map is small against the kernel, some kernel taps only ever meet
  zero padding: a 3x3 convolution with padding 1 on a 1x1 map uses its centre tap alone. Those
  taps are cropped away with the padding they faced. On the demo ResNet-18 at 28x28 the last
  block runs on 1x1 maps and its 3x3 convolutions read nine times the weights they need; a small
  batch there is bound by reading weights, so cropping made it 2-4x faster on a 2-core CPU.
  A cropped convolution keeps the full one for inputs of any other size, so the rewrite is
  exact for every input, not only the traced one.

Values change only by float rounding (the folded bias is added in another order). Tracing with
torch.fx patches ``nn.Module`` process-wide while it runs, so segments are rewritten when the
model loads, before anything else runs modules. Counts in the bank (MACs from
``torch.utils.flop_counter`` on the plain model) are untouched: they describe the model, not how
fast this machine runs it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger("dyce.rewrites")


@dataclass(frozen=True)
class SegmentRewrite:
    """What was rewritten in one segment."""

    folded_norms: int
    cropped_convs: int
    traced: bool  # False: torch.fx could not trace it, so nothing was folded

    def __str__(self) -> str:
        return f"{self.folded_norms} folded, {self.cropped_convs} cropped" + ("" if self.traced else " (not traced)")


class CroppedConv2d(nn.Module):
    """``full`` with the kernel taps that only meet padding at one input size cropped away;
    inputs of any other size run ``full``."""

    def __init__(self, full: nn.Conv2d, cropped: nn.Conv2d, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.full = full
        self.cropped = cropped
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == self.input_size:
            return self.cropped(x)
        return self.full(x)


@torch.no_grad()
def rewrite_segment(segment: nn.Module, example: torch.Tensor) -> tuple[nn.Module, SegmentRewrite]:
    """A rewritten copy of ``segment`` (which must be in eval mode) for inputs shaped like ``example``.

    The copy is checked against ``segment`` on a random input of that shape; should tracing have
    changed what it computes, ``segment`` itself is returned (nothing rewritten) and a warning
    says so."""
    if segment.training:
        raise ValueError("rewrites fold batch-norm statistics: the segment must be in eval mode")
    rewritten = copy.deepcopy(segment)
    norms_before = _count(rewritten, nn.BatchNorm2d)
    traced = True
    try:
        rewritten = fuse(rewritten, inplace=True)
    except Exception as err:  # control flow on values, custom leaves: run it unfolded
        log.debug("could not trace %s for folding: %s", type(segment).__name__, err)
        traced = False
    folded = norms_before - _count(rewritten, nn.BatchNorm2d)
    cropped = crop_dead_taps(rewritten, example)
    probe = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example)
    # Without TF32: cuDNN rounds folded and unfolded weights differently there, enough over a deep
    # segment to refuse an exact rewrite.
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        expected, got = segment(probe), rewritten(probe)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max()):
        log.warning("rewriting %s changed its outputs; it runs as it is", type(segment).__name__)
        return segment, SegmentRewrite(0, 0, traced)
    return rewritten, SegmentRewrite(folded, cropped, traced)


@torch.no_grad()
def crop_dead_taps(module: nn.Module, example: torch.Tensor) -> int:
    """Replace, inside ``module``, every convolution with kernel taps that only meet zero
    padding on ``example``'s sizes by a ``CroppedConv2d``; returns how many."""
    input_sizes: dict[nn.Conv2d, tuple[int, int]] = {}

    def record(conv: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        input_sizes[conv] = tuple(args[0].shape[-2:])

    convs = [m for m in module.modules() if type(m) is nn.Conv2d]
    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    try:
        module(example)
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and child in input_sizes:
                cropped = _cropped(child, input_sizes[child])
                if cropped is not None:
                    setattr(parent, name, CroppedConv2d(child, cropped, input_sizes[child]))
                    replaced += 1
    return replaced


def _cropped(conv: nn.Conv2d, input_size: tuple[int, int]) -> nn.Conv2d | None:
    """``conv`` without the taps that meet only padding at ``input_size``; None if none do (or
    the crop cannot be written as a symmetric-padding convolution of the same output size)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    spans, paddings = [], []
    for size, k, s, p, d in zip(input_size, conv.kernel_size, conv.stride, conv.padding, conv.dilation, strict=True):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        live = [i for i in range(k) if any(0 <= o * s - p + i * d < size for o in range(out))]
        if not live:
            return None
        first, last = live[0], live[-1]
        new_padding = p - first * d
        new_out = (size + 2 * new_padding - d * (last - first) - 1) // s + 1
        if new_padding < 0 or new_out != out:
            return None
        spans.append((first, last + 1))
        paddings.append(new_padding)
    (r0, r1), (c0, c1) = spans
    if (r1 - r0, c1 - c0) == tuple(conv.kernel_size):
        return None
    cropped = nn.Conv2d(
        conv.in_channels, conv.out_channels, (r1 - r0, c1 - c0), conv.stride, tuple(paddings), conv.dilation,
        conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    cropped.weight.copy_(conv.weight[:, :, r0:r1, c0:c1])
    if conv.bias is not None:
        cropped.bias.copy_(conv.bias)
    return cropped.eval().requires_grad_(False)


def _count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())
