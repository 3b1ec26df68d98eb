"""``dyce-offline``: the offline toolchain, one command per step, plus ``build`` for all of them.

Every command works on one artefact directory: ``--artifacts`` (or ``$DYCE_ARTIFACTS_DIR``, as the service reads it,
default ``./artifacts``), and reads what the previous step wrote there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from .layout import OfflineLayout, default_root

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)


@app.callback()
def main(
    ctx: typer.Context,
    artifacts: Annotated[
        Path | None, typer.Option(envvar="DYCE_ARTIFACTS_DIR", help="artefact directory (default ./artifacts)")
    ] = None,
) -> None:
    ctx.obj = OfflineLayout(artifacts or default_root())


Device = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default: CUDA when available)")]
PrecisionOption = Annotated[
    str | None,
    typer.Option(help="auto (bf16 where the hardware has it natively, else fp32) | bf16 | fp32; default: the recipe's"),
]


def _precision(value: str | None) -> str | None:
    if value not in (None, "auto", "bf16", "fp32"):
        raise typer.BadParameter("precision must be auto, bf16 or fp32")
    return value


def _echo(model) -> None:
    typer.echo(model.model_dump_json(indent=1) if hasattr(model, "model_dump_json") else json.dumps(model, indent=1))


@app.command()
def data(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(help="fashion-mnist | image-folder")] = "fashion-mnist",
    path: Annotated[Path | None, typer.Option(help="IDX directory or ImageFolder root (train/, test/)")] = None,
    search_size: int = 10_000,
    seed: int = 0,
    download: Annotated[bool, typer.Option(help="download Fashion-MNIST via torchvision if absent")] = False,
) -> None:
    """Fix the exit-train / search / test splits."""
    from .data import prepare_data

    if source not in ("fashion-mnist", "image-folder"):
        raise typer.BadParameter("source must be fashion-mnist or image-folder")
    _echo(prepare_data(ctx.obj, source, path, search_size, seed, download=download))  # type: ignore[arg-type]


@app.command("train-backbone")
def train_backbone_command(
    ctx: typer.Context,
    epochs: Annotated[int | None, typer.Option(help="default: the recipe's")] = None,
    max_lr: Annotated[float | None, typer.Option(help="default: the recipe's")] = None,
    seed: Annotated[int | None, typer.Option(help="default: the recipe's")] = None,
    batch_size: Annotated[int | None, typer.Option(help="default: the recipe's")] = None,
    precision: PrecisionOption = None,
    device: Device = None,
) -> None:
    """Train the demo backbone (resnet18_fmnist) on the exit-train split."""
    from .train_backbone import BackboneRecipe, train_backbone

    given = {
        "epochs": epochs,
        "max_lr": max_lr,
        "seed": seed,
        "batch_size": batch_size,
        "precision": _precision(precision),
    }
    recipe = BackboneRecipe(**{k: v for k, v in given.items() if v is not None})
    _echo(train_backbone(ctx.obj, recipe, device=device))


@app.command("import-backbone")
def import_backbone(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="registered backbone, e.g. resnet50")],
    weights: Annotated[str, typer.Option(help="torchvision weights name (e.g. DEFAULT) or a state_dict file")],
) -> None:
    """Use a pre-trained backbone instead of training one (labels and transforms from the weights)."""
    from .import_backbone import import_backbone as run

    _echo(run(ctx.obj, name, weights))


@app.command("train-exits")
def train_exits_command(
    ctx: typer.Context,
    kinds: Annotated[str, typer.Option(help="comma-separated exit kinds")] = ",".join(
        ("mlp1", "mlp3x500", "mlp3x1000", "mlp5x500", "mlp5x1000")
    ),
    epochs: int = 3,
    targets: Annotated[str, typer.Option(help="soft (eq. 2-3, default) | hard (labels)")] = "soft",
    precision: Annotated[str, typer.Option(help="auto (native bf16 only) | bf16 | fp32")] = "auto",
    device: Device = None,
) -> None:
    """Train every candidate exit with the backbone frozen."""
    from .train_exits import ExitRecipe, train_exits

    if targets not in ("soft", "hard"):
        raise typer.BadParameter("targets must be soft or hard")
    recipe = ExitRecipe(
        kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
        epochs=epochs,
        targets=targets,
        precision=_precision(precision),  # type: ignore[arg-type]
    )
    _echo(train_exits(ctx.obj, recipe, device=device))


@app.command("train-saver")
def train_saver_command(
    ctx: typer.Context,
    kinds: Annotated[str, typer.Option(help="comma-separated saver kinds (dyce.savers registry)")] = "cnn_small",
    epochs: int = 6,
    precision: Annotated[str, typer.Option(help="auto (native bf16 only) | bf16 | fp32")] = "auto",
    device: Device = None,
) -> None:
    """Train candidate savers (TinySaver): tiny models on the raw input, distilled from the backbone."""
    from .train_saver import SaverRecipe, train_saver

    recipe = SaverRecipe(
        kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
        epochs=epochs,
        precision=_precision(precision),  # type: ignore[arg-type]
    )
    _echo(train_saver(ctx.obj, recipe, device=device))


@app.command("record")
def record_command(
    ctx: typer.Context,
    device: Device = None,
    savers: Annotated[
        bool | None, typer.Option("--savers/--no-savers", help="saver stage in front (default: if trained)")
    ] = None,
) -> None:
    """Record every exit's confidence, prediction and correctness on the search and test splits."""
    from .records import record

    _echo(record(ctx.obj, device=device, savers=savers).model_dump(include={"num_candidates", "sizes"}))


@app.command()
def search(
    ctx: typer.Context,
    algorithms: Annotated[str, typer.Option(help="comma-separated: iterative, single_pass, baseline")] = (
        "iterative,single_pass,baseline"
    ),
    grid: Annotated[str, typer.Option(help="adaptive (refined, >= 50 distinct) | uniform (0..1 step 0.01)")] = (
        "adaptive"
    ),
    cost: Annotated[
        str, typer.Option(help="macs (the paper) | latency (measured time of `dyce-offline profile`)")
    ] = "macs",
    batch: Annotated[int, typer.Option(min=1, help="with --cost latency: images per step the server runs")] = 32,
) -> None:
    """Search configurations over the lambda grid and write the bank."""
    from .bank_builder import build_bank

    chosen = tuple(a.strip() for a in algorithms.split(",") if a.strip())
    if grid not in ("adaptive", "uniform") or not set(chosen) <= {"iterative", "single_pass", "baseline"}:
        raise typer.BadParameter("unknown grid or algorithm")
    if cost not in ("macs", "latency"):
        raise typer.BadParameter("cost is macs or latency")
    grid_kind: Literal["adaptive", "uniform"] = grid  # type: ignore[assignment]
    _, runs = build_bank(ctx.obj, chosen, grid_kind, cost=cost, batch=batch)  # type: ignore[arg-type]
    typer.echo(json.dumps([r.model_dump() for r in runs], indent=1))


@app.command("profile")
def profile_command(
    ctx: typer.Context,
    device: Device = None,
    max_batch: Annotated[int, typer.Option(min=1, help="largest batch bucket (the server's DYCE_MAX_BATCH_SIZE)")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per part and bucket (median kept)")] = 5,
    threads: Annotated[int | None, typer.Option(help="intra-op threads, as DYCE_TORCH_THREADS will be")] = None,
    rewrite: Annotated[
        bool, typer.Option(help="time the segments rewritten, as DYCE_REWRITE_SEGMENTS (default true) will run them")
    ] = True,
) -> None:
    """Time every segment, exit and the head per batch bucket on this device (for --cost latency)."""
    from .profile import profile

    result = profile(ctx.obj, device=device, max_batch=max_batch, repeats=repeats, threads=threads, rewrite=rewrite)
    typer.echo(
        json.dumps(
            {
                "profile": str(ctx.obj.profile),
                "where": result.where.model_dump(),
                "plain_ms_per_image": {b: round(result.per_image_s(b) * 1e3, 4) for b in result.buckets},
            }
        )
    )


@app.command()
def report(ctx: typer.Context) -> None:
    """Plot the trade-off curves and write the Table II-style summary."""
    from .report import make_report

    _echo(make_report(ctx.obj))


@app.command("export-onnx")
def export_onnx_command(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option(help="directory for the graphs (default <artifacts>/onnx)")] = None,
    opset: int = 18,
    device: Annotated[str, typer.Option(help="where to trace the graphs (the graphs run anywhere)")] = "cpu",
) -> None:
    """Export segments, head and every exit the bank uses to ONNX, for DYCE_BACKEND=onnxruntime."""
    from dyce.artifacts import ArtifactLayout, load_bank_for, load_model

    from .export_onnx import export_onnx

    layout = ArtifactLayout(ctx.obj.root)
    bank = load_bank_for(layout)
    model = load_model(layout, savers=bank.saver_stage)
    model.check_bank(bank)
    manifest = export_onnx(
        model.backbone, model.exits, bank.used_exits(), out or layout.root / "onnx", opset, device=device
    )
    typer.echo(
        json.dumps(
            {
                "directory": str(out or layout.root / "onnx"),
                "segments": len(manifest.segments),
                "exits": sorted(manifest.exits),
                "opset": manifest.opset,
            }
        )
    )


@app.command()
def build(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="rerun every step")] = False,
    subset: Annotated[int | None, typer.Option(help="small demo: this many exit-training images")] = None,
    precision: PrecisionOption = None,
    device: Device = None,
    saver: Annotated[
        bool, typer.Option("--saver/--no-saver", help="train a saver (TinySaver) and search with it")
    ] = True,
) -> None:
    """Run every missing or stale step for the Fashion-MNIST demo (a step is stale when what it
    was made from changed: an input's content or its recipe), and say why each one runs."""
    from .build import BuildOptions, build, demo_options

    options = demo_options(subset) if subset else BuildOptions()
    if not saver:
        options = options.model_copy(update={"saver": None})
    if _precision(precision):
        options = options.with_precision(precision)  # type: ignore[arg-type]
    ran = build(ctx.obj, options.model_copy(update={"device": device}), force=force)
    typer.echo(json.dumps({"artifacts": str(ctx.obj.root), "ran": ran}))
