"""Does the early-exit executor realise the MAC savings the simulation predicts?

For resnet50 (random weights, 3x224x224) and the demo resnet18_fmnist (1x28x28), build
configurations whose simulated relative MACs span ~30-100%, then time the executor against the
plain torchvision model at batch 1 and batch 32 on this machine and print

    ratio = realised_gain / predicted_gain,  realised = t_plain / t_config,  predicted = 1 / C.

Batch 1 runs ``EarlyExitExecutor.run`` image by image. Batch 32 is measured twice: ``run`` on
each batch of 32 (the batch shrinks as samples leave) and ``EarlyExitPipeline`` (continuous
early-exit batching: survivors wait for later arrivals so every segment runs on full batches),
which is how the service serves.

Random weights are not confident, so thresholds are set from measured confidence quantiles of
the very images that are timed: the chosen fractions then exit at the chosen positions, and
the simulated C is exactly the work the executor has to do.

The plain model is timed through the same backend with the final-only configuration (every
segment, then the head: the tests prove it equals torchvision's output), so the ratio isolates
early exit from the backend's own layout choices (channels-last, cache-sized micro-batches of
high-resolution segments on CPU); torchvision's own ``model(x)`` is timed beside it.

Last line: JSON with min_ratio_bs1 and min_ratio_bs32 (the worst configuration's ratio, pipeline),
and min_ratio_bs32_per_batch (plain ``run``).
Run: python bench/realisation.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import json

import numpy as np
import torch
import typer
from measure import best_time, print_rows
from rich.console import Console
from rich.progress import track

from dyce.backbones import build_backbone
from dyce.config import ExitConfiguration
from dyce.executor import EarlyExitExecutor
from dyce.exits import ExitSet
from dyce.macs import measure_macs
from dyce.pipeline import EarlyExitPipeline
from dyce.recording import record_batch
from dyce.simulate import ExitRecords, simulate

console = Console(stderr=True)

# Per model: images timed, and plans {position fraction of N: (candidate k, quantile)}.
PLANS = {
    "mostly_late": {0.5: (1, 0.7)},
    "mid": {0.25: (1, 0.6), 0.5: (1, 0.5)},
    "early": {0.07: (1, 0.35), 0.25: (1, 0.5)},
    "very_early": {0.07: (1, 0.15), 0.2: (1, 0.3)},
}
MODELS = {"resnet50": 64, "resnet18_fmnist": 512}


def make_config(records: ExitRecords, plan: dict[float, tuple[int, float]]) -> ExitConfiguration:
    n_positions = records.num_positions
    exits, thresholds = [0] * n_positions, [1.0] * n_positions
    for where, (k, q) in plan.items():
        n = min(n_positions - 2, int(round(where * (n_positions - 1))))
        exits[n] = k
        thresholds[n] = float(np.quantile(records.confidence[n, k - 1], q))
    exits[-1], thresholds[-1] = 1, 0.0
    return ExitConfiguration(exits=tuple(exits), thresholds=tuple(thresholds))


def time_runs(fn, images: torch.Tensor, batch: int, repeats: int, device: torch.device) -> float:
    """Best wall time for ``fn`` to process every image in chunks of ``batch``."""
    chunks = [images[i : i + batch] for i in range(0, images.shape[0], batch)]
    fn(chunks[:1])  # warm-up of this batch size's kernels
    return best_time(lambda: fn(chunks), repeats, device)


def measure_model(name: str, repeats: int, dev: torch.device) -> list[dict]:
    rows = []
    count = MODELS[name]
    backbone = build_backbone(name)
    exits = ExitSet.build([s[0] for s in backbone.position_shapes()], backbone.num_classes, ("mlp1",))
    macs = measure_macs(backbone, exits)
    images = torch.randn(count, *backbone.input_spec.shape)
    confidence, prediction = record_batch(backbone, exits, images)
    labels = prediction[-1, 0]
    records = ExitRecords(confidence.numpy(), (prediction == labels).numpy(), tuple(exits.num_candidates))
    executor = EarlyExitExecutor(backbone, exits, macs, device=dev)

    def plain(x, model=executor.backbone.model):
        with torch.inference_mode():
            return torch.softmax(model(executor.prepare(x)), dim=1).cpu()

    def pipelined(batches, config):
        executor.set_config(config)
        return list(EarlyExitPipeline(executor, batch_size=32).run(batches))

    full = ExitConfiguration.final_only(backbone.num_positions)
    for batch, mode in ((1, "run"), (32, "run"), (32, "pipeline")):
        t_torchvision = time_runs(lambda chunks: [plain(c) for c in chunks], images, batch, repeats, dev)
        t_plain = time_runs(lambda chunks: [executor.run(x, full) for x in chunks], images, batch, repeats, dev)
        for label, plan in track(PLANS.items(), description=f"{name} bs{batch} {mode}", console=console):
            config = make_config(records, plan)
            predicted_macs = simulate(records, config, macs).relative_macs
            if mode == "run":
                step = lambda chunks, c=config: [executor.run(x, c) for x in chunks]  # noqa: E731
            else:
                step = lambda chunks, c=config: pipelined([(x, list(range(len(x)))) for x in chunks], c)  # noqa: E731
            t_config = time_runs(step, images, batch, repeats, dev)
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "mode": mode,
                    "config": label,
                    "predicted_rel_macs": round(predicted_macs, 4),
                    "torchvision_ms_per_image": round(1000 * t_torchvision / count, 3),
                    "plain_ms_per_image": round(1000 * t_plain / count, 3),
                    "config_ms_per_image": round(1000 * t_config / count, 3),
                    "predicted_gain": round(1 / predicted_macs, 3),
                    "realised_gain": round(t_plain / t_config, 3),
                    "ratio": round((t_plain / t_config) * predicted_macs, 3),
                }
            )
    return rows


def main(repeats: int = 3, device: str = "cpu", models: str = ",".join(MODELS)) -> None:
    dev = torch.device(device)
    torch.manual_seed(0)
    rows = [row for name in models.split(",") for row in measure_model(name, repeats, dev)]

    print_rows(console, f"Realised vs MAC-predicted gain ({device}, {torch.get_num_threads()} threads)", rows)

    def worst(batch: int, mode: str) -> float:
        return min(r["ratio"] for r in rows if r["batch"] == batch and r["mode"] == mode)

    summary = {
        "min_ratio_bs1": worst(1, "run"),
        "min_ratio_bs32": worst(32, "pipeline"),
        "min_ratio_bs32_per_batch": worst(32, "run"),
        "device": device,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    typer.run(main)
