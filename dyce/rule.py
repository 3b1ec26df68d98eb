"""The exit rule (paper eq. 4-5, Alg. 1 line 6): a sample leaves at an enabled exit when the
maximum softmax probability of that exit is not less than the exit's threshold.

This module is the *only* definition. The offline simulation (numpy, over recorded
confidences) and the run-time executor (torch, over live tensors) both call ``should_exit``,
and both derive confidences with ``confidence_and_prediction``, so they cannot drift apart.
"""

from __future__ import annotations

from typing import TypeVar

import torch

ArrayLike = TypeVar("ArrayLike")


def should_exit(confidence: ArrayLike, threshold: float) -> ArrayLike:
    """Boolean mask of samples that exit: ``confidence >= threshold`` (numpy or torch)."""
    return confidence >= threshold


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of an exit's logits, computed in float32 whatever the model dtype."""
    return torch.softmax(logits.float(), dim=1)


def confidence_and_prediction(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (max probability) and predicted class per sample."""
    return probs.max(dim=1)
