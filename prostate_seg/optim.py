"""Learning-rate schedules not in torch (torch's own are used directly from the configs)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class PolyLR(LambdaLR):
    """nnU-Net's polynomial decay, stepped per epoch: ``lr * (1 - epoch / max_epochs) ** exponent``."""

    def __init__(self, optimizer: Optimizer, max_epochs: int, exponent: float = 0.9):
        super().__init__(optimizer, lambda epoch: max(0.0, 1.0 - epoch / max_epochs) ** exponent)
