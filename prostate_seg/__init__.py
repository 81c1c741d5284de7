"""prostate-seg: prostate gland segmentation on T2 MRI, and a loss-function study around it."""

__version__ = "0.1.0"
