"""Step `train-exits` (paper Sec. IV-B): every candidate exit (each kind at every early position)
trained with the backbone frozen.

Loss: the soft cross-entropy of eq. 2-3 against the backbone's own softmax output (label-free,
the default) or plain cross-entropy on hard labels; Adam, lr 3e-4.

The paper's exits start with global average pooling, and a frozen backbone always produces the
same features, so the pooled features of every position are computed in ONE backbone pass and
the MLPs are trained on that cache, kept on the training device. Exits of other architectures
(registered kinds that need the full feature maps) take the general path: the frozen backbone
runs again every epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from torch.nn import functional as F
from tqdm import tqdm

from dyce.artifacts import backbone_identity, load_backbone, save_exits
from dyce.backbones import SegmentedModel
from dyce.exits import PAPER_EXIT_KINDS, ExitSet, PooledMLPExit
from dyce.hashing import state_dict_sha256
from dyce.numerics import Numerics, Precision, choose_numerics

from .data import load_split
from .features import backbone_pass, save_teacher
from .layout import OfflineLayout
from .loading import batches
from .provenance import current_inputs, write_step_manifest
from .train_backbone import frozen

console = Console(stderr=True)


class ExitRecipe(BaseModel):
    model_config = ConfigDict(frozen=True)

    kinds: tuple[str, ...] = PAPER_EXIT_KINDS
    epochs: int = 3
    batch_size: int = 256
    lr: float = 3e-4
    targets: str = "soft"  # "soft": eq. 2-3 against the backbone's output; "hard": the labels
    # auto: bf16 autocast for the MLP matmuls where the hardware has native bf16 (2x on
    # AVX512-BF16), fp32 where it would be emulated (dyce.numerics).
    precision: Precision = "auto"
    seed: int = 0


class ExitTrainingReport(BaseModel):
    recipe: ExitRecipe
    train_images: int
    seconds: float
    backbone_sha256: str
    numerics: Numerics


def exit_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor, targets: str) -> torch.Tensor:
    if targets == "soft":
        return -(teacher_probs * F.log_softmax(logits.float(), dim=1)).sum(1).mean()  # eq. 3
    return F.cross_entropy(logits.float(), labels)


def train_on_pooled(
    exits: ExitSet,
    pooled: list[torch.Tensor],
    teacher: torch.Tensor,
    labels: torch.Tensor,
    recipe: ExitRecipe,
    generator: torch.Generator,
    numerics: Numerics | None = None,
) -> None:
    """Train the MLP of every pooled exit on cached pooled features (one optimiser, summed
    losses: the exits share no parameter, so this is each exit trained on its own). The exits
    train where the cache is."""
    numerics = numerics or choose_numerics(recipe.precision, str(labels.device))
    heads = [(s.position, exits.exit(s.position, s.index).mlp) for s in exits.all_specs() if _pooled(exits, s)]
    if not heads:
        return
    # fused: one kernel over all ~30M exit parameters instead of a pass per tensor; the MLPs are
    # small, so the optimiser step is a third of each training step otherwise (same arithmetic).
    optimiser = torch.optim.Adam([p for _, mlp in heads for p in mlp.parameters()], lr=recipe.lr, fused=True)
    m = len(labels)
    for epoch in range(recipe.epochs):
        permutation = torch.randperm(m, generator=generator).to(labels.device)
        bar = tqdm(permutation.split(recipe.batch_size), desc=f"exits epoch {epoch + 1}/{recipe.epochs}", leave=False)
        for idx in bar:
            with numerics.autocast():
                loss = sum(
                    exit_loss(mlp(pooled[n][idx]), teacher[idx], labels[idx], recipe.targets) for n, mlp in heads
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item() / len(heads):.3f}")


def _pooled(exits: ExitSet, spec) -> bool:
    return isinstance(exits.exit(spec.position, spec.index), PooledMLPExit)


def train_on_maps(
    backbone: SegmentedModel,
    exits: ExitSet,
    dataset,
    recipe: ExitRecipe,
    generator: torch.Generator,
    numerics: Numerics | None = None,
) -> None:
    """The general path: exits that need full feature maps, the frozen backbone run every epoch
    (on the backbone's device)."""
    general = [spec for spec in exits.all_specs() if not _pooled(exits, spec)]
    if not general:
        return
    device = str(next(backbone.parameters()).device)
    numerics = numerics or choose_numerics(recipe.precision, device)
    modules = [exits.exit(s.position, s.index) for s in general]
    optimiser = torch.optim.Adam([p for module in modules for p in module.parameters()], lr=recipe.lr, fused=True)
    for epoch in range(recipe.epochs):
        loader = batches(dataset, recipe.batch_size, device, shuffle=True, generator=generator)
        for images, labels in tqdm(loader, desc=f"map exits epoch {epoch + 1}/{recipe.epochs}", leave=False):
            with torch.no_grad():
                x, outputs = images.contiguous(memory_format=torch.channels_last), []
                for segment in backbone.segments:
                    x = segment(x)
                    outputs.append(x)
                teacher = torch.softmax(backbone.head(x), dim=1)
            with numerics.autocast():
                loss = sum(
                    exit_loss(module(outputs[s.position]), teacher, labels, recipe.targets)
                    for s, module in zip(general, modules, strict=True)
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()


def pooled_features(backbone: SegmentedModel, dataset, positions: Sequence[int], device: str | None = None):
    """Global-average-pooled outputs of ``positions`` and the backbone's softmax, one pass,
    cached on ``device`` (default: the backbone's)."""
    pooled: list[list[torch.Tensor]] = [[] for _ in range(backbone.num_positions)]
    teacher, labels = [], []

    def keep(outputs, logits, batch_labels):
        for n in positions:
            pooled[n].append(outputs[n].float().mean(dim=(2, 3)))
        teacher.append(torch.softmax(logits.float(), dim=1))
        labels.append(batch_labels)

    backbone_pass(backbone, dataset, keep, desc="pooling features", device=device)
    return (
        [torch.cat(p) if p else torch.empty(0) for p in pooled],
        torch.cat(teacher),
        torch.cat(labels),
    )


def train_exits(
    layout: OfflineLayout, recipe: ExitRecipe | None = None, device: str | None = None
) -> ExitTrainingReport:
    recipe = recipe or ExitRecipe()
    numerics = choose_numerics(recipe.precision, device)
    console.print(f"train-exits: {numerics.describe()}")
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    inputs = current_inputs(layout, ("splits", "backbone"))
    backbone, manifest = load_backbone(layout)
    frozen(backbone)
    before = state_dict_sha256(backbone.model)
    channels = [shape[0] for shape in backbone.position_shapes()]
    exits = ExitSet.build(channels, backbone.num_classes, recipe.kinds)
    backbone.to(numerics.device, memory_format=torch.channels_last)
    exits.to(numerics.device)
    dataset = load_split(layout, "exit_train", manifest.preprocess)
    start = time.perf_counter()
    pooled_positions = sorted({s.position for s in exits.all_specs() if _pooled(exits, s)})
    pooled, teacher, labels = pooled_features(backbone, dataset, pooled_positions)
    save_teacher(layout, teacher)
    exits.train()
    train_on_pooled(exits, pooled, teacher, labels, recipe, generator, numerics)
    train_on_maps(backbone, exits, dataset, recipe, generator, numerics)
    exits.eval().to("cpu")
    backbone.to("cpu", memory_format=torch.contiguous_format)
    seconds = time.perf_counter() - start
    after = state_dict_sha256(backbone.model)
    if after != before:
        raise RuntimeError("exit training changed the backbone's weights")
    save_exits(layout, exits, backbone_identity(backbone))
    report = ExitTrainingReport(
        recipe=recipe, train_images=len(labels), seconds=round(seconds, 1), backbone_sha256=after, numerics=numerics
    )
    layout.exit_training.write_text(report.model_dump_json(indent=1))
    write_step_manifest(layout, "train-exits", "train-exits", recipe, inputs)
    return report
