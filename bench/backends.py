"""Torch eager vs ONNX Runtime for the early-exit executor.

For resnet50 (random weights, 3x224x224) and the demo resnet18_fmnist (1x28x28): export the
segments and head to ONNX, then time the executor on the full model (final-only configuration,
so both backends do exactly the same work) at batch 1 and batch 32: per-image latency and
throughput. Last line: JSON with ort_over_torch_bs1 and ort_over_torch_bs32 (the worse of the
two models: throughput of onnxruntime / throughput of torch).

Run: python bench/backends.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import json
import tempfile

import torch
import typer
from measure import best_time, print_rows
from rich.console import Console

from dyce.backbones import build_backbone
from dyce.execution_backends import OnnxRuntimeBackend
from dyce.executor import EarlyExitExecutor
from dyce.exits import ExitSet
from dyce.macs import measure_macs
from offline.export_onnx import export_onnx

console = Console(stderr=True)
IMAGES = {"resnet50": 64, "resnet18_fmnist": 512}


def run_all(executor: EarlyExitExecutor, images: torch.Tensor, batch: int, repeats: int) -> float:
    chunks = [images[i : i + batch] for i in range(0, images.shape[0], batch)]
    return best_time(lambda: [executor.run(chunk) for chunk in chunks], repeats, executor.device)


def main(repeats: int = 3, device: str = "cpu", models: str = ",".join(IMAGES)) -> None:
    dev = torch.device(device)
    rows = []
    for name in models.split(","):
        torch.manual_seed(0)
        backbone = build_backbone(name)
        exits = ExitSet.build([s[0] for s in backbone.position_shapes()], backbone.num_classes, (), positions=[])
        macs = measure_macs(backbone, exits)
        images = torch.randn(IMAGES[name], *backbone.input_spec.shape)
        with tempfile.TemporaryDirectory() as onnx_dir:
            console.print(f"[bold]{name}[/]: exporting to ONNX")
            export_onnx(backbone, exits, set(), onnx_dir)
            executors = {
                "torch": EarlyExitExecutor(backbone, exits, macs, device=dev),
                "onnxruntime": EarlyExitExecutor(backbone, exits, macs, backend=OnnxRuntimeBackend(onnx_dir, dev)),
            }
            for batch in (1, 32):
                seconds = {k: run_all(ex, images, batch, repeats) for k, ex in executors.items()}
                for backend, t in seconds.items():
                    rows.append(
                        {
                            "model": name,
                            "batch": batch,
                            "backend": backend,
                            "ms_per_image": round(1000 * t / len(images), 3),
                            "images_per_s": round(len(images) / t, 1),
                            "speedup_vs_torch": round(seconds["torch"] / t, 3),
                        }
                    )
    print_rows(console, f"Executor backends ({device}, {torch.get_num_threads()} torch threads)", rows)

    def worst(batch: int) -> float:
        return min(r["speedup_vs_torch"] for r in rows if r["batch"] == batch and r["backend"] == "onnxruntime")

    print(
        json.dumps({"ort_over_torch_bs1": worst(1), "ort_over_torch_bs32": worst(32), "device": device, "rows": rows})
    )


if __name__ == "__main__":
    typer.run(main)
