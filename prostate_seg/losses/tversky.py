"""Tversky loss (Salehi et al., 2017); Dice loss is its alpha = beta = 0.5 case."""

from __future__ import annotations

from torch import Tensor, nn

from prostate_seg.losses.functional import tversky_index
from prostate_seg.settings import check_loss_numbers, tversky_beta


class TverskyLoss(nn.Module):
    """``1 - TI`` with TI = (TP + s) / (TP + alpha*FP + beta*FN + s).

    ``alpha`` weights FALSE POSITIVES and ``beta`` FALSE NEGATIVES: a small alpha (large beta)
    punishes missed gland pixels more and pushes recall up. ``beta`` defaults to ``1 - alpha``.
    Probabilities are ``sigmoid(logits)``; counts are pooled over the whole batch, like smp's
    default (MONAI's only with ``batch=True``). The alpha/beta roles are MONAI's and smp's;
    some Focal-Tversky code swaps them.
    """

    def __init__(self, alpha: float = 0.5, beta: float | None = None, smooth: float = 1.0):
        super().__init__()
        beta = tversky_beta(alpha, beta)
        check_loss_numbers({"alpha": alpha, "beta": beta, "smooth": smooth})
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return 1.0 - tversky_index(logits, target, self.alpha, self.beta, self.smooth)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, smooth={self.smooth}"
