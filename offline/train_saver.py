"""Step `train-saver` (TinySaver): candidate savers, small independent models that see the raw
input, distilled from the frozen backbone on the exit-train split.

Same loss as the exits (soft cross-entropy of eq. 2-3 against the backbone's softmax), so no
label is needed; the backbone's outputs come from the cache train-exits leaves
(``offline.features.teacher_probabilities``) when it is current, else from one backbone pass.
AdamW under a one-cycle schedule: a few epochs reach a tiny model's plateau.

The saver's worth is decided later, by the search: it sees the savers as the candidates of an
extra position in front of the backbone (``dyce.savers``) and every bank entry chooses whether
to use one and at which threshold.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from torch.utils.data import Dataset, TensorDataset
from tqdm import tqdm

from dyce.artifacts import load_backbone, save_savers
from dyce.macs import count_macs
from dyce.numerics import Numerics, Precision, choose_numerics
from dyce.savers import build_saver

from .data import load_split
from .features import teacher_probabilities
from .layout import OfflineLayout
from .loading import batches, num_batches
from .provenance import current_inputs, write_step_manifest
from .train_backbone import frozen
from .train_exits import exit_loss

console = Console(stderr=True)


class SaverRecipe(BaseModel):
    model_config = ConfigDict(frozen=True)

    kinds: tuple[str, ...] = ("cnn_small",)
    epochs: int = 6
    batch_size: int = 256
    max_lr: float = 3e-3
    weight_decay: float = 1e-4
    precision: Precision = "auto"
    seed: int = 0


class SaverReport(BaseModel):
    kind: str
    macs: int
    relative_macs: float = Field(description="of the plain backbone's MACs")
    seconds: float
    teacher_agreement: float = Field(description="share of exit-train images where it predicts the backbone's class")


class SaverTrainingReport(BaseModel):
    recipe: SaverRecipe
    train_images: int
    numerics: Numerics
    savers: list[SaverReport]


class _Indexed(Dataset):
    """(image, row index): lets shuffled batches of any dataset find their teacher rows."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.dataset[i][0], i


def indexed(dataset: Dataset) -> Dataset:
    if isinstance(dataset, TensorDataset):  # stays one tensor: the fast in-memory batching path
        return TensorDataset(dataset.tensors[0], torch.arange(len(dataset)))
    return _Indexed(dataset)


def distil(
    saver: torch.nn.Module,
    dataset: Dataset,
    teacher: torch.Tensor,
    recipe: SaverRecipe,
    numerics: Numerics,
    generator: torch.Generator,
    desc: str,
) -> float:
    """Train ``saver`` on ``dataset`` towards ``teacher`` (rows in dataset order); returns its
    agreement with the teacher's class over the last epoch."""
    device = torch.device(numerics.device)
    saver.to(device, memory_format=torch.channels_last).train()
    teacher = teacher.to(device)
    optimiser = torch.optim.AdamW(saver.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay, fused=True)
    steps = recipe.epochs * num_batches(dataset, recipe.batch_size, drop_last=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.max_lr, total_steps=steps)
    data = indexed(dataset)
    agree = seen = 0
    for epoch in range(recipe.epochs):
        agree = seen = 0
        loader = batches(data, recipe.batch_size, device, shuffle=True, generator=generator, drop_last=True)
        bar = tqdm(loader, total=steps // recipe.epochs, desc=f"{desc} epoch {epoch + 1}/{recipe.epochs}", leave=False)
        for images, rows in bar:
            target = teacher.index_select(0, rows)
            with numerics.autocast():
                logits = saver(images.contiguous(memory_format=torch.channels_last))
            loss = exit_loss(logits, target, rows, "soft")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            agree += int((logits.argmax(1) == target.argmax(1)).sum())
            seen += len(rows)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    saver.eval().to("cpu", memory_format=torch.contiguous_format)
    return agree / max(seen, 1)


def train_saver(
    layout: OfflineLayout, recipe: SaverRecipe | None = None, device: str | None = None
) -> SaverTrainingReport:
    recipe = recipe or SaverRecipe()
    if not recipe.kinds:
        raise ValueError("a saver recipe needs at least one kind")
    numerics = choose_numerics(recipe.precision, device)
    console.print(f"train-saver: {numerics.describe()}")
    inputs = current_inputs(layout, ("splits", "backbone"))
    backbone, manifest = load_backbone(layout)
    frozen(backbone)
    dataset = load_split(layout, "exit_train", manifest.preprocess)
    backbone.to(numerics.device, memory_format=torch.channels_last)
    teacher = teacher_probabilities(layout, backbone, dataset)
    backbone.to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(1, *backbone.input_spec.shape)
    backbone_macs = count_macs(backbone.eval(), example)
    savers, reports = [], []
    for kind in recipe.kinds:
        torch.manual_seed(recipe.seed)
        saver = build_saver(kind, backbone.input_spec, backbone.num_classes)
        macs = count_macs(saver.eval(), example)
        start = time.perf_counter()
        agreement = distil(
            saver, dataset, teacher, recipe, numerics, torch.Generator().manual_seed(recipe.seed), f"saver {kind}"
        )
        reports.append(
            SaverReport(
                kind=kind,
                macs=macs,
                relative_macs=macs / backbone_macs,
                seconds=round(time.perf_counter() - start, 1),
                teacher_agreement=agreement,
            )
        )
        console.print(
            f"  saver {kind}: {macs / 1e6:.2f} MMACs ({macs / backbone_macs:.1%} of the backbone), "
            f"agrees with the backbone on {agreement:.1%} of exit-train images"
        )
        savers.append(saver)
    save_savers(layout, savers, recipe.kinds, manifest.identity)
    report = SaverTrainingReport(recipe=recipe, train_images=len(teacher), numerics=numerics, savers=reports)
    layout.saver_training.write_text(report.model_dump_json(indent=1))
    write_step_manifest(layout, "train-saver", "train-saver", recipe, inputs)
    return report
