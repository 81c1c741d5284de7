"""Functional core shared by the overlap losses.

Conventions:
  * inputs are raw logits; probabilities are ``sigmoid(logits)``;
  * counts are *soft* and *batch-pooled*: every pixel of the batch adds to one TP/FP/FN sum,
    so an empty slice cannot produce a 0/0. This is segmentation_models_pytorch's default (it
    sums over the batch and pixel axes); MONAI's DiceLoss/TverskyLoss pool only with
    ``batch=True`` and by default compute one ratio per image, then average;
  * ``alpha`` weights false positives, ``beta`` false negatives, as in both MONAI and smp;
  * under DDP the training batch is split over processes; the counts of a training step are
    summed over all of them (a differentiable all-reduce) before the ratio, so every process
    computes the loss of the whole global batch and DDP's averaged gradient is exactly the
    one-device gradient. Without gradients (validation) the counts stay local: processes
    may see different numbers of validation batches, and a collective there would hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _training_under_ddp() -> bool:
    return (torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def soft_confusion(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft TP, FP, FN summed over the whole (global) batch, in float32 even under autocast."""
    probs = torch.sigmoid(logits.float())
    target = target.float()
    counts = torch.stack([(probs * target).sum(), (probs * (1.0 - target)).sum(),
                          ((1.0 - probs) * target).sum()])
    if _training_under_ddp():
        # torch's differentiable all-reduce (what the deprecated torch.distributed.nn points
        # to): a sum whose backward sums the gradients back to every process
        from torch.distributed._functional_collectives import all_reduce

        counts = all_reduce(counts, "sum", dist.group.WORLD)
    tp, fp, fn = counts.unbind()
    return tp, fp, fn


def tversky_index(
    logits: Tensor, target: Tensor, alpha: float, beta: float, smooth: float = 1.0
) -> Tensor:
    """TI = (TP + s) / (TP + alpha*FP + beta*FN + s) on sigmoid probabilities."""
    tp, fp, fn = soft_confusion(logits, target)
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


# 1 - TI is floored here before the power: d/dx x^(1/gamma) is infinite at x = 0 for gamma > 1,
# and a saturated sigmoid can make TI exactly 1 (a NaN gradient instead of a zero one).
_FOCAL_FLOOR = 1e-6


def focal_tversky_loss(
    logits: Tensor, target: Tensor, alpha: float, beta: float, gamma: float, smooth: float = 1.0
) -> Tensor:
    """(1 - TI) ** (1 / gamma): Abraham & Khan's definition; gamma = 1 is the Tversky loss."""
    one_minus = 1.0 - tversky_index(logits, target, alpha, beta, smooth)
    return one_minus.clamp_min(_FOCAL_FLOOR) ** (1.0 / gamma)
