"""Segmentation losses. All take raw logits and a {0,1} target of the same shape.

``bce`` is :class:`torch.nn.BCEWithLogitsLoss` itself (configured in ``conf/loss/bce.yaml``).
"""

from prostate_seg.losses.combined import CombinedLoss
from prostate_seg.losses.dice import DiceLoss
from prostate_seg.losses.focal_tversky import FocalTverskyLoss
from prostate_seg.losses.functional import focal_tversky_loss, soft_confusion, tversky_index
from prostate_seg.losses.tversky import TverskyLoss

__all__ = ["CombinedLoss", "DiceLoss", "FocalTverskyLoss", "TverskyLoss", "focal_tversky_loss",
           "soft_confusion", "tversky_index"]
