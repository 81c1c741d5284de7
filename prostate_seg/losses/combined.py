"""Weighted sum of losses, e.g. BCE + Tversky (the usual nnU-Net-style compound loss)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prostate_seg.settings import check_loss_numbers


class CombinedLoss(nn.Module):
    """``sum_k weights[k] * terms[k](logits, target)``; every term sees the same logits."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        if set(terms) != set(weights):
            raise ValueError(
                f"loss.weights keys {sorted(weights)} must match loss.terms keys {sorted(terms)}"
            )
        check_loss_numbers({"weights": weights})
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(w) for name, w in weights.items()}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        total = torch.zeros((), device=logits.device)
        for name, term in self.terms.items():
            total = total + self.weights[name] * term(logits, target.to(logits.dtype))
        return total
