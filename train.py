"""Train the U-Net: `python train.py [overrides]`, or a sweep: `python train.py -m loss.alpha=0.25,0.5`."""

from prostate_seg.cli import hydra_entry
from prostate_seg.training import objective

if __name__ == "__main__":
    hydra_entry(objective, config_name="train")
