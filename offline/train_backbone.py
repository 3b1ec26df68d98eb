"""Step `train-backbone`: the demo backbone (``resnet18_fmnist``) trained on the exit-train split.

Only the demo needs this; real users bring a pre-trained backbone (``import-backbone``).
Recipe, chosen for a 2-core CPU: SGD with Nesterov momentum under a one-cycle schedule,
label smoothing, random crop with padding + horizontal flip, channels_last (oneDNN's fast
convolution layout on CPU; ~1.3x the throughput of NCHW here). Numerics follow the hardware
(``dyce.numerics``): bf16 autocast where it is native, fp32 where bf16 would be emulated.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from dyce.artifacts import save_backbone
from dyce.backbones import SegmentedModel, build_backbone
from dyce.numerics import Numerics, Precision, choose_numerics
from dyce.preprocess import FASHION_MNIST

from .data import load_manifest, load_split
from .layout import OfflineLayout
from .loading import batches, num_batches
from .provenance import current_inputs, write_step_manifest

DEMO_BACKBONE = "resnet18_fmnist"
console = Console(stderr=True)


class BackboneRecipe(BaseModel):
    model_config = ConfigDict(frozen=True)

    epochs: int = 8
    batch_size: int = 256
    max_lr: float = 0.15
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    crop_padding: int = 2
    # auto: bf16 autocast where the hardware has it (oneDNN's AVX512-BF16 kernels train ~1.4x
    # faster than fp32 on 2 cores), fp32 where torch would emulate bf16 (several times slower).
    precision: Precision = "auto"
    seed: int = 0


class BackboneTrainingReport(BaseModel):
    recipe: BackboneRecipe
    train_images: int
    seconds: float
    images_per_second: float
    accuracy: dict[str, float]
    numerics: Numerics


def augment(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding (a random shift of up to ``padding`` pixels) and a
    random horizontal flip, per image, on a whole batch at once (on the batch's device; the
    random draws come from the CPU ``generator`` so a seed means the same run everywhere)."""
    m, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4, value=float(images.min()))
    dy, dx = (torch.randint(0, 2 * padding + 1, (2, m), generator=generator)).to(device).unbind(0)
    rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None].expand(m, c, h, w + 2 * padding)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :].expand(m, c, h, w)
    cropped = cropped.gather(3, cols)
    flip = (torch.rand(m, generator=generator) < 0.5).to(device)
    cropped[flip] = cropped[flip].flip(3)
    return cropped


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 1000, desc: str = "evaluate", device: str | None = None
) -> float:
    """Plain fp32 accuracy (what the service computes), on the model's own device by default."""
    model.eval()
    device = device or str(next(model.parameters()).device)
    correct = total = 0
    for images, labels in tqdm(
        batches(dataset, batch_size, device), total=num_batches(dataset, batch_size), desc=desc, leave=False
    ):
        logits = model(images.contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def fit(model: torch.nn.Module, dataset: Dataset, recipe: BackboneRecipe, numerics: Numerics) -> None:
    generator = torch.Generator().manual_seed(recipe.seed)
    steps = num_batches(dataset, recipe.batch_size, drop_last=True)
    optimiser = torch.optim.SGD(
        model.parameters(), lr=recipe.max_lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=steps
    )
    for epoch in range(recipe.epochs):
        model.train()
        loader = batches(dataset, recipe.batch_size, numerics.device, shuffle=True, generator=generator, drop_last=True)
        bar = tqdm(
            loader, total=steps, desc=f"backbone epoch {epoch + 1}/{recipe.epochs} ({numerics.precision})", leave=False
        )
        for images, labels in bar:
            images = augment(images, recipe.crop_padding, generator).contiguous(memory_format=torch.channels_last)
            with numerics.autocast():
                loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def train_backbone(
    layout: OfflineLayout, recipe: BackboneRecipe | None = None, device: str | None = None
) -> BackboneTrainingReport:
    """Train the demo backbone, save it as the shared artefact and report its accuracy."""
    recipe = recipe or BackboneRecipe()
    numerics = choose_numerics(recipe.precision, device)
    console.print(f"train-backbone: {numerics.describe()}")
    torch.manual_seed(recipe.seed)
    inputs = current_inputs(layout, ("splits",))
    manifest = load_manifest(layout)
    if manifest.source != "fashion-mnist":
        raise ValueError("train-backbone trains the Fashion-MNIST demo; bring your own backbone with import-backbone")
    backbone = build_backbone(DEMO_BACKBONE, num_classes=len(manifest.labels))
    train = load_split(layout, "exit_train")
    model = backbone.model.to(numerics.device, memory_format=torch.channels_last)
    start = time.perf_counter()
    fit(model, train, recipe, numerics)
    seconds = time.perf_counter() - start
    accuracy = {split: evaluate(model, load_split(layout, split), desc=f"accuracy {split}") for split in ("test",)}
    model.to("cpu", memory_format=torch.contiguous_format)
    save_backbone(layout, backbone, list(manifest.labels), FASHION_MNIST)
    report = BackboneTrainingReport(
        recipe=recipe,
        train_images=len(train),
        seconds=round(seconds, 1),
        images_per_second=round(recipe.epochs * len(train) / seconds, 1),
        accuracy=accuracy,
        numerics=numerics,
    )
    layout.backbone_training.write_text(report.model_dump_json(indent=1))
    write_step_manifest(layout, "train-backbone", "train-backbone", recipe, inputs)
    return report


def frozen(backbone: SegmentedModel) -> SegmentedModel:
    """Eval mode and no gradients: the exits' training must never change the backbone."""
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone
