"""Dice loss: the Tversky loss at alpha = beta = 0.5, with no weight left to choose."""

from __future__ import annotations

from prostate_seg.losses.tversky import TverskyLoss


class DiceLoss(TverskyLoss):
    """``1 - Dice`` = ``1 - TI`` at alpha = beta = 0.5: a false positive (alpha) and a false
    negative (beta) weigh alike. It takes no alpha, so that ``loss=dice`` with an alpha is
    refused (and a sweep over alpha runs it once) instead of a Tversky loss named dice."""

    alpha = beta = 0.5  # also on the class: a run records them (training.fit.hparams_of)

    def __init__(self, smooth: float = 1.0):
        super().__init__(alpha=0.5, beta=0.5, smooth=smooth)
