"""Step `profile`: time every segment, candidate exit and the head per batch bucket, on the
device and backend that will serve (``dyce.profile``), into ``<artifacts>/profile.json``.

``dyce-offline search --cost latency`` then searches on that measured time instead of MACs,
and the bank records where the time was measured (the service warns when it serves elsewhere).
"""

from __future__ import annotations

from typing import Literal

import torch
from rich.progress import Progress

from dyce.artifacts import load_model
from dyce.execution_backends import TorchBackend
from dyce.numerics import resolve_device
from dyce.profile import LatencyProfile, Where, default_buckets, host_name, measure_latency

from .layout import OfflineLayout
from .provenance import current_inputs, write_step_manifest

Backend = Literal["torch"]


def profile(
    layout: OfflineLayout,
    device: str | None = None,
    backend: Backend = "torch",
    max_batch: int = 32,
    repeats: int = 5,
    threads: int | None = None,
    rewrite: bool = True,
) -> LatencyProfile:
    """``threads``: intra-op threads, as the server will run (``DYCE_TORCH_THREADS``); default torch's."""
    inputs = current_inputs(layout, ("backbone", "exits", "savers"))
    device = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    # With savers, the saver stage is timed like any segment and its savers like any exit.
    model = load_model(layout)
    backbone, exits, manifest = model.backbone, model.exits, model.backbone_manifest
    if backend != "torch":
        # The search needs every candidate exit's time, and export-onnx writes only the exits
        # a bank uses: profiling the ONNX Runtime backend needs an export of all candidates first.
        raise ValueError("profile supports the torch backend only, for now")
    # Time the segments as dyce-serve will run them: rewritten or not (DYCE_REWRITE_SEGMENTS) and
    # tuned (its default, DYCE_MEMORY_FORMAT=auto).
    runner = TorchBackend(backbone, exits, torch.device(device), True, rewrite=rewrite)
    runner.tune_segments(torch.randn(max_batch, *backbone.input_spec.shape, device=device))
    where = Where(
        device_type=torch.device(device).type,
        backend=backend,
        host=host_name(device),
        threads=torch.get_num_threads(),
        segment_rewrites=runner.rewritten,
        memory_format="auto",  # tuned above, as dyce-serve tunes by default
    )
    buckets = default_buckets(max_batch)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"profiling on {where.host} ({backend})", total=len(buckets))
        result = measure_latency(
            runner,
            backbone.input_spec.shape,
            exits,
            where,
            manifest.identity.weights_sha256,
            buckets,
            repeats,
            progress=lambda _: bar.advance(task),
        )
    layout.profile.write_text(result.model_dump_json(indent=1))
    recipe = {
        "device": device, "backend": backend, "max_batch": max_batch, "repeats": repeats, "threads": threads,
        "rewrite": rewrite,
    }  # fmt: skip
    write_step_manifest(layout, "profile", "profile", recipe, inputs)
    return result
