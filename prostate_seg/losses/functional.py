"""Functional core shared by the overlap losses.

Conventions (the same as MONAI and segmentation_models_pytorch):
  * inputs are raw logits; probabilities are ``sigmoid(logits)``;
  * counts are *soft* and *batch-pooled*: every pixel of the batch adds to one TP/FP/FN sum,
    so an empty slice cannot produce a 0/0;
  * ``alpha`` weights false positives, ``beta`` false negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor


def soft_confusion(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft TP, FP, FN summed over the whole batch (computed in float32 even under autocast)."""
    probs = torch.sigmoid(logits.float())
    target = target.float()
    tp = (probs * target).sum()
    fp = (probs * (1.0 - target)).sum()
    fn = ((1.0 - probs) * target).sum()
    return tp, fp, fn


def tversky_index(
    logits: Tensor, target: Tensor, alpha: float, beta: float, smooth: float = 1.0
) -> Tensor:
    """TI = (TP + s) / (TP + alpha*FP + beta*FN + s) on sigmoid probabilities."""
    tp, fp, fn = soft_confusion(logits, target)
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
