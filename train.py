"""Train the U-Net: `python train.py [overrides]`, or a sweep: `python train.py -m loss.alpha=0.25,0.5`."""

from prostate_seg.cli import train

if __name__ == "__main__":
    train()
