"""Small builders shared by the core tests: a random-weight demo backbone with exits, and
configurations whose thresholds are set from measured confidences (random weights are not
confident, so fixed thresholds would make nothing exit)."""

from __future__ import annotations

import numpy as np
import torch

from dyce.backbones import build_backbone
from dyce.config import ExitConfiguration
from dyce.exits import ExitSet
from dyce.macs import measure_macs
from dyce.recording import record_batch
from dyce.simulate import ExitRecords


def demo_parts(kinds=("mlp1", "mlp3x500"), seed=0):
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18_fmnist")
    exits = ExitSet.build([s[0] for s in backbone.position_shapes()], backbone.num_classes, kinds).eval()
    return backbone, exits, measure_macs(backbone, exits)


def records_for(backbone, exits, images, labels) -> ExitRecords:
    confidence, prediction = record_batch(backbone, exits, images)
    return ExitRecords(
        confidence=confidence.numpy().astype(np.float32),
        correct=(prediction == torch.as_tensor(labels)).numpy(),
        num_candidates=tuple(exits.num_candidates),
    )


def quantile_config(records: ExitRecords, plan: dict[int, tuple[int, float]]) -> ExitConfiguration:
    """``plan[n] = (k, q)``: enable candidate k at position n with the threshold at quantile q of
    its recorded confidences, so roughly a fraction 1-q of the samples reaching it exits."""
    n_positions = records.num_positions
    exits, thresholds = [0] * n_positions, [1.0] * n_positions
    for n, (k, q) in plan.items():
        exits[n] = k
        thresholds[n] = float(np.quantile(records.confidence[n, k - 1], q))
    exits[-1], thresholds[-1] = 1, 0.0
    return ExitConfiguration(exits=tuple(exits), thresholds=tuple(thresholds))
