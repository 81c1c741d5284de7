"""Focal Tversky loss (Abraham & Khan, ISBI 2019, arXiv:1810.07842)."""

from __future__ import annotations

from torch import Tensor

from prostate_seg.losses.functional import focal_tversky_loss
from prostate_seg.losses.tversky import TverskyLoss
from prostate_seg.settings import check_loss_numbers


class FocalTverskyLoss(TverskyLoss):
    """``(1 - TI) ** (1 / gamma)``, TI = (TP + s) / (TP + alpha*FP + beta*FN + s) as in
    :class:`TverskyLoss`.

    ``alpha`` weights FALSE POSITIVES and ``beta`` false negatives, as everywhere in this
    project. The paper writes the weights the other way round (its alpha multiplies the false
    negatives): its setting alpha = 0.7, beta = 0.3 is ``alpha=0.3, beta=0.7`` here.

    ``gamma`` follows the paper, FTL = (1 - TI)^(1/gamma) with gamma in [1, 3] (best: 4/3).
    The authors' released code and segmentation_models_pytorch instead raise to the power
    gamma itself, so their ``gamma=0.75`` is ``gamma=4/3`` here. gamma = 1 is the Tversky loss;
    gamma > 1 makes the loss larger, and its gradient steeper, the closer TI is to 1, so
    training keeps pushing on batches that are nearly right (the paper: small lesions, whose
    TI stays below 1); gamma < 1 flattens it there, as the focal loss down-weights easy cases.
    """

    def __init__(self, alpha: float = 0.3, beta: float | None = None, gamma: float = 4 / 3,
                 smooth: float = 1.0):
        super().__init__(alpha, beta, smooth)
        check_loss_numbers({"gamma": gamma})
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_tversky_loss(logits, target, self.alpha, self.beta, self.gamma, self.smooth)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"
