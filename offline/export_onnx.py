"""Export the backbone's segments, its head and the exits a bank uses as ONNX graphs.

Each graph has a dynamic batch axis (the executor compacts batches between segments) and is
recorded in ``manifest.json`` with the hash of the torch weights it came from, so the service
refuses graphs that do not belong to the loaded backbone and bank.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from dyce.artifacts import backbone_identity
from dyce.backbones import SegmentedModel
from dyce.execution_backends import OnnxGraph, OnnxManifest
from dyce.exits import ExitSet
from dyce.hashing import state_dict_sha256

# 18 covers every op of the registered torchvision families (LayerNorm for ConvNeXt,
# Hardswish/Hardsigmoid for MobileNetV3, SiLU for EfficientNet).
DEFAULT_OPSET = 18


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """torch.export-based ONNX export with the batch axis dynamic."""
    module = module.eval()
    batch = torch.export.Dim("batch", max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
            # ONNX Runtime optimises every graph when it loads it; skipping the exporter's own
            # pass cuts export time by a third with the same run-time graphs.
            optimize=False,
        )
    program.save(str(path))


@torch.no_grad()
def export_onnx(
    backbone: SegmentedModel,
    exits: ExitSet,
    used_exits: Iterable[tuple[int, int]],
    directory: str | Path,
    opset: int = DEFAULT_OPSET,
    device: str = "cpu",
) -> OnnxManifest:
    """``device``: where the graphs are traced. The graphs themselves carry no device (ONNX Runtime
    picks its provider when it loads them), so this only matters for tracing speed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone = backbone.eval().to(device, memory_format=torch.contiguous_format)
    exits = exits.to(device)
    used = sorted(set(used_exits))
    # Batch 2 in the examples: a batch of 1 would let the exporter specialise the batch axis.
    x = torch.zeros(2, *backbone.input_spec.shape, device=device)
    segments, exit_graphs = [], {}
    with Progress(transient=True) as progress:
        task = progress.add_task("export ONNX", total=backbone.num_positions + 1 + len(used))
        for n, segment in enumerate(backbone.segments):
            if isinstance(segment, nn.Identity):  # a saver stage: nothing to run
                segments.append(OnnxGraph(file=None, sha256=state_dict_sha256(segment)))
            else:
                name = f"segment_{n:02d}.onnx"
                export_graph(segment, x, directory / name, opset)
                segments.append(OnnxGraph(file=name, sha256=state_dict_sha256(segment)))
            progress.advance(task)
            for k in (k for (p, k) in used if p == n):
                module = exits.exit(n, k).eval()
                name = f"exit_{n:02d}_{k}.onnx"
                export_graph(module, segment(x), directory / name, opset)
                exit_graphs[OnnxManifest.exit_key(n, k)] = OnnxGraph(file=name, sha256=state_dict_sha256(module))
                progress.advance(task)
            x = segment(x)
        export_graph(backbone.head, x, directory / "head.onnx", opset)
        progress.advance(task)
    manifest = OnnxManifest(
        backbone=backbone_identity(backbone),
        opset=opset,
        segments=tuple(segments),
        head=OnnxGraph(file="head.onnx", sha256=state_dict_sha256(backbone.head)),
        exits=exit_graphs,
    )
    (directory / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    return manifest
