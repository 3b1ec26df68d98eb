"""What actually runs a segment, an exit or the head: eager PyTorch or ONNX Runtime.

The executor and pipeline own the early-exit logic (the exit rule, compaction, queues); a
backend only maps a batch tensor to the next tensor. Both backends take and return torch
tensors, so softmax, ``should_exit`` and ``index_select`` are the same code whatever runs the
network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .backbones import SegmentedModel
from .bank import BackboneIdentity
from .exits import ExitSet
from .segment_rewrites import SegmentRewrite, rewrite_segment
from .timing import median_time


class ExecutionBackend(Protocol):
    name: str
    device: torch.device

    def prepare(self, images: torch.Tensor) -> torch.Tensor: ...
    def segment(self, position: int, x: torch.Tensor) -> torch.Tensor: ...
    def exit_logits(self, position: int, index: int, x: torch.Tensor) -> torch.Tensor: ...
    def head_logits(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        backbone: SegmentedModel,
        exits: ExitSet,
        device: torch.device,
        channels_last: bool = True,
        cache_bytes: int | None = 4 << 20,
        rewrite: bool = True,
    ):
        """``rewrite``: run exact rewrites of the segments and of the exits that have anything to
        rewrite (``dyce.segment_rewrites``: batch norms folded, kernel taps that only meet padding
        cropped) instead of the loaded modules."""
        self.device = device
        # NHWC lets oneDNN/cuDNN pick fast kernels for every layer (NCHW max-pooling alone costs
        # more than the whole first block on CPU), so time follows MACs more closely. Values and
        # weight hashes are unchanged: only strides differ.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone = backbone.to(device, memory_format=self.memory_format).eval()
        self.exits = exits.to(device).eval()
        self.segments: list[nn.Module] = list(self.backbone.segments)
        self.exit_modules: list[list[nn.Module]] = [list(candidates) for candidates in self.exits.candidates]
        self.rewrites: list[SegmentRewrite] = []
        self.exit_rewrites: dict[tuple[int, int], SegmentRewrite] = {}
        # One dummy pass through the segments gives each position's output shape and, when
        # rewriting, the example input each rewrite is traced and checked on.
        x = torch.zeros(1, *backbone.input_spec.shape, device=device, dtype=next(backbone.parameters()).dtype)
        shapes: list[tuple[int, ...]] = []
        # no_grad, not inference_mode: inference tensors as weights would refuse later in-place
        # updates and any call with grad enabled.
        with torch.no_grad():
            for n, segment in enumerate(backbone.segments):
                if rewrite:
                    rewritten, done = rewrite_segment(segment, x)
                    self.segments[n] = rewritten.to(memory_format=self.memory_format).requires_grad_(False)
                    self.rewrites.append(done)
                x = segment(x)
                shapes.append(tuple(x.shape[1:]))
                for k, module in enumerate(self.exit_modules[n], start=1):
                    # A saver (a small CNN on the raw image, run on every request) has batch norms
                    # to fold; pooled-MLP exits have nothing to rewrite and stay uncopied.
                    if rewrite and any(isinstance(m, REWRITABLE) for m in module.modules()):
                        rewritten, done = rewrite_segment(module, x)
                        self.exit_modules[n][k - 1] = rewritten.requires_grad_(False)
                        self.exit_rewrites[(n, k)] = done
        # What each segment's weights and input are laid out as, and below how many rows a batch
        # runs one row per call (0: never); ``tune_segments`` sets both per segment.
        self.memory_formats = [self.memory_format] * backbone.num_positions
        self.singly_below = [0] * backbone.num_positions
        # On CPU a high-resolution segment run on a whole batch streams its activations through
        # memory instead of cache: resnet50's first blocks run ~1.4x slower per image at batch 32
        # than at batch 1, so wall time drifts from MACs toward the early segments. Such segments
        # run in micro-batches whose output fits ``cache_bytes``; GPUs want whole batches.
        self.rows_per_call = [None] * backbone.num_positions
        if device.type == "cpu" and cache_bytes:
            for n, shape in enumerate(shapes):
                self.rows_per_call[n] = max(1, cache_bytes // (4 * math.prod(shape)))

    @property
    def rewritten(self) -> bool:
        """Whether any segment or exit runs rewritten (what a latency profile of this backend timed)."""
        return any(r.folded_norms or r.cropped_convs for r in [*self.rewrites, *self.exit_rewrites.values()])

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_formats[0]) if x.dim() == 4 else x

    def segment(self, position: int, x: torch.Tensor) -> torch.Tensor:
        segment, rows = self.segments[position], self.rows_per_call[position]
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_formats[position])  # free when it already is
        if 1 < x.shape[0] < self.singly_below[position]:
            return torch.cat([segment(row) for row in x.split(1)])
        if rows is None or x.shape[0] <= rows:
            return segment(x)
        return torch.cat([segment(chunk) for chunk in x.split(rows)])

    def exit_logits(self, position: int, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.exit_modules[position][index - 1](x)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.head(x)

    @torch.inference_mode()
    def tune_segments(
        self, images: torch.Tensor, batch_sizes: Sequence[int] | None = None, repeats: int = 5
    ) -> list[SegmentTuning]:
        """Time every segment on this machine, on ``images`` carried through the segments, at
        ``batch_sizes`` (default: 1, 2, 4, 8, a quarter of the images, all of them), and keep for each:

        * the memory format with the lower sum of per-image times over those sizes, so the small
          batches early exit leaves at deep positions count as much as full ones;
        * whether batches below some size run one row per call: where a call on a few rows costs
          more than that many single-row calls (oneDNN picks other kernels for one row).

        Why measure: neither choice holds everywhere. On a 2-core EPYC, oneDNN's NHWC kernels were
        up to 5x faster on the demo's 28x28 and 4x4 maps at batch 1, its NCHW ones 1.3-2x faster
        on the deep 2x2 and 1x1 maps, and there two rows cost 2.3x one row. Values do not change,
        only strides and how rows are grouped into calls.
        """
        if batch_sizes is None:
            largest = images.shape[0]
            batch_sizes = sorted({min(b, largest) for b in (1, 2, 4, 8)} | {max(1, largest // 4), largest})
        x = self.prepare(images[: max(batch_sizes)])
        for position, segment in enumerate(self.segments):
            if x.dim() == 4 and any(p.dim() == 4 for p in segment.parameters()):
                self.singly_below[position] = 0  # time whole calls only
                timed: dict[torch.memory_format, dict[int, float]] = {}
                # The layout it has first, so a tie keeps it.
                for memory_format in sorted(LAYOUTS, key=lambda f: f != self.memory_formats[position]):
                    segment.to(memory_format=memory_format)
                    self.memory_formats[position] = memory_format
                    timed[memory_format] = {b: self._seconds(position, x[:b], repeats) for b in batch_sizes}
                best = min(timed, key=lambda f: sum(t / b for b, t in timed[f].items()))
                segment.to(memory_format=best)
                self.memory_formats[position] = best
                one_row = timed[best].get(1)
                if one_row is not None:
                    # (size, whole call no dearer than its rows one by one) for every timed size > 1; row
                    # by row only where clearly cheaper (a fifth), so timing noise does not decide
                    whole = [(b, ROW_BY_ROW_MARGIN * t <= b * one_row) for b, t in sorted(timed[best].items()) if b > 1]
                    if whole and not whole[0][1]:  # up to the first size where it is not
                        self.singly_below[position] = next((b for b, cheaper in whole if cheaper), max(batch_sizes) + 1)
            x = self.segment(position, x)
        return [SegmentTuning(f, n) for f, n in zip(self.memory_formats, self.singly_below, strict=True)]

    def _seconds(self, position: int, x: torch.Tensor, repeats: int) -> float:
        return median_time(lambda: self.segment(position, x), repeats, self.device, TUNING_BUDGET_S)[0]


LAYOUTS = (torch.channels_last, torch.contiguous_format)
REWRITABLE = (nn.Conv2d, nn.BatchNorm2d)
ROW_BY_ROW_MARGIN = 0.8
# Timed per segment, layout and size, past the first call: fewer repeats of long calls keep the
# warm-up of a large model (resnet50 at 224 px on a small CPU) in seconds, not minutes.
TUNING_BUDGET_S = 0.05


@dataclass(frozen=True)
class SegmentTuning:
    """How one segment runs: its layout, and below how many rows a batch runs one row per call
    (0: never)."""

    memory_format: torch.memory_format
    singly_below: int

    def __str__(self) -> str:
        layout = "NHWC" if self.memory_format == torch.channels_last else "NCHW"
        return layout if self.singly_below <= 2 else f"{layout}, by row below {self.singly_below}"


class OnnxGraph(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str | None = Field(description="None: an identity segment (a saver stage), which passes its input on")
    sha256: str  # of the torch weights it was exported from


class OnnxManifest(BaseModel):
    """Ties exported graphs to the exact backbone and exit weights they came from."""

    model_config = ConfigDict(frozen=True)

    backbone: BackboneIdentity
    opset: int
    segments: tuple[OnnxGraph, ...]
    head: OnnxGraph
    exits: dict[str, OnnxGraph]  # key "<position>.<index>"

    @staticmethod
    def exit_key(position: int, index: int) -> str:
        return f"{position}.{index}"

    @classmethod
    def load(cls, directory: str | Path) -> OnnxManifest:
        return cls.model_validate_json((Path(directory) / "manifest.json").read_text())


class OnnxRuntimeBackend:
    """One ONNX Runtime session per segment, per exit and for the head.

    CUDA execution provider when the device is CUDA and onnxruntime-gpu is installed (with IO
    binding, so tensors stay on the GPU between segments); CPU execution provider otherwise.
    """

    name = "onnxruntime"

    def __init__(self, directory: str | Path, device: torch.device, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = OnnxManifest.load(self.directory)
        self.device = device
        use_cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        if device.type == "cuda" and not use_cuda:
            raise RuntimeError("device is CUDA but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        self._io_binding = use_cuda
        providers = (
            [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
            if use_cuda
            else ["CPUExecutionProvider"]
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # Every segment is its own session with its own thread pool; spinning pools of idle
        # sessions steal the cores from the one that runs (measured: 6x slower at batch 1).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(graph: OnnxGraph):
            return ort.InferenceSession(str(self.directory / graph.file), options, providers=providers)

        self._segments = [None if g.file is None else session(g) for g in self.manifest.segments]
        self._head = session(self.manifest.head)
        self._exits = {key: session(g) for key, g in self.manifest.exits.items()}

    def check_matches(self, backbone: BackboneIdentity, exit_hashes: dict[tuple[int, int], str]) -> None:
        """Refuse graphs exported from other weights than the ones the bank was searched for."""
        if self.manifest.backbone != backbone:
            raise ValueError(f"ONNX graphs in {self.directory} were exported from another backbone")
        for key, graph in self.manifest.exits.items():
            position, index = map(int, key.split("."))
            if exit_hashes.get((position, index)) != graph.sha256:
                raise ValueError(f"ONNX exit {key} in {self.directory} was exported from other weights")

    def has_exit(self, position: int, index: int) -> bool:
        return OnnxManifest.exit_key(position, index) in self._exits

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).float().contiguous()

    def _run(self, session, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if not self._io_binding:
            return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        binding = session.io_binding()
        binding.bind_input(
            session.get_inputs()[0].name, "cuda", x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr()
        )
        binding.bind_output(session.get_outputs()[0].name, "cuda", x.device.index or 0)
        session.run_with_iobinding(binding)
        output = binding.get_outputs()[0]
        # dlpack hands the GPU buffer to torch without a copy. OrtValue speaks the __dlpack__
        # protocol in current onnxruntime-gpu (1.31 has no to_dlpack any more); older ones only to_dlpack.
        if hasattr(output, "__dlpack__"):
            return torch.from_dlpack(output)
        return torch.utils.dlpack.from_dlpack(output.to_dlpack())

    def segment(self, position: int, x: torch.Tensor) -> torch.Tensor:
        session = self._segments[position]
        return x if session is None else self._run(session, x)

    def exit_logits(self, position: int, index: int, x: torch.Tensor) -> torch.Tensor:
        try:
            session = self._exits[OnnxManifest.exit_key(position, index)]
        except KeyError:
            raise ValueError(f"exit ({position}, {index}) was not exported to ONNX") from None
        return self._run(session, x)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self._head, x)
