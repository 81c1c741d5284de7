from prostate_seg.models.unet import UNet

__all__ = ["UNet"]
