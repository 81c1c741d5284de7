"""Segmentation metrics; their conventions are the science's (docs/METHOD.md).

Predictions are ``logit > 0``. Per-volume scores pool a patient's voxels and average over the
volumes seen; an empty denominator scores 1 when nothing was missed or wrongly found, else 0.
An undefined HD95 (one mask empty) is the volume's diagonal, flagged, never dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric


def _ratio(num: Tensor, den: Tensor, empty_value: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), empty_value)


def scores_from_counts(counts: Tensor) -> dict[str, Tensor]:
    """Per-row Dice, precision and recall from ``counts[..., (TP, FP, FN)]``."""
    counts = counts.double()
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    one, zero = torch.ones_like(tp), torch.zeros_like(tp)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, one),
        "precision": _ratio(tp, tp + fp, torch.where(fn == 0, one, zero)),
        "recall": _ratio(tp, tp + fn, torch.where(fp == 0, one, zero)),
    }


def confusion(pred: Tensor, target: Tensor) -> Tensor:
    """(TP, FP, FN) per sample of boolean ``pred``/``target`` (N, ...) -> (N, 3) int64."""
    pred, target = pred.flatten(1), target.flatten(1)
    return torch.stack([(pred & target).sum(1), (pred & ~target).sum(1),
                        (~pred & target).sum(1)], dim=1)


class VolumeConfusion(Metric):
    """TP/FP/FN and slices seen per patient volume, over batches and DDP processes."""

    full_state_update = False
    # compute()'s scores: per-volume means, then the Dice of all volumes' counts pooled
    NAMES = ("dice", "precision", "recall", "dice_global")

    def __init__(self, num_volumes: int):
        super().__init__()
        self.add_state("counts", default=torch.zeros(num_volumes, 3, dtype=torch.long),
                       dist_reduce_fx="sum")
        self.add_state("slices", default=torch.zeros(num_volumes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, volume: Tensor) -> None:
        per_sample = confusion(logits > 0, target > 0.5)
        volume = volume.to(self.counts.device)
        self.counts.index_add_(0, volume, per_sample)
        self.slices.index_add_(0, volume, torch.ones_like(volume))

    def compute(self) -> dict[str, Tensor]:
        seen = self.slices > 0
        per_volume = scores_from_counts(self.counts[seen])
        pooled = scores_from_counts(self.counts.sum(0))
        return dict(zip(self.NAMES, (per_volume["dice"].mean(), per_volume["precision"].mean(),
                                     per_volume["recall"].mean(), pooled["dice"])))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile symmetric surface distance: 0 when both volumes are empty, ``inf`` when
    exactly one is."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    pred_surface, truth_surface = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return float(max(np.percentile(to_truth[pred_surface], 95),
                     np.percentile(to_pred[truth_surface], 95)))


def volume_scores(pred: np.ndarray, truth: np.ndarray,
                  spacing: tuple[float, ...]) -> dict[str, float | int]:
    """Dice, precision, recall and HD95 (the diagonal, flagged, when undefined) of a volume."""
    counts = confusion(torch.from_numpy(pred.astype(bool))[None],
                       torch.from_numpy(truth.astype(bool))[None])[0]
    scores: dict[str, float | int] = {k: float(v) for k, v in scores_from_counts(counts).items()}
    distance = hd95(pred, truth, spacing)
    failed = not np.isfinite(distance)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    scores.update(hd95=diagonal if failed else distance, hd95_failed=int(failed),
                  voxels_pred=int(pred.sum()), voxels_true=int(truth.sum()),
                  voxels_total=int(pred.size))
    return scores
