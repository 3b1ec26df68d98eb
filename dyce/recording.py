"""Run every candidate exit and the final head on a batch: the raw material of the offline
simulation. Confidences come from the same functions the executor uses (``dyce.rule``)."""

from __future__ import annotations

import torch

from .backbones import SegmentedModel
from .exits import ExitSet
from .rule import confidence_and_prediction, probabilities


@torch.inference_mode()
def record_batch(backbone: SegmentedModel, exits: ExitSet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and prediction of candidate k at position n for every image: two (N, K, B)
    tensors on CPU, K = max candidates per position; missing candidates have confidence NaN and
    prediction -1. The final head is candidate 1 of the last position."""
    num_positions, batch = backbone.num_positions, images.shape[0]
    width = max(exits.num_candidates)
    confidence = torch.full((num_positions, width, batch), float("nan"))
    prediction = torch.full((num_positions, width, batch), -1, dtype=torch.int64)
    x = images
    for n, segment in enumerate(backbone.segments):
        x = segment(x)
        heads = [backbone.head] if n == num_positions - 1 else list(exits.candidates[n])
        for k, head in enumerate(heads):
            conf, pred = confidence_and_prediction(probabilities(head(x)))
            confidence[n, k], prediction[n, k] = conf.cpu(), pred.cpu()
    return confidence, prediction
