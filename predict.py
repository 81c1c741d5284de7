"""Segment new scans: `python predict.py ckpt_path=CKPT input=SCAN.nii.gz output=MASK.nii.gz`."""

from prostate_seg.cli import hydra_entry
from prostate_seg.predict import run

if __name__ == "__main__":
    hydra_entry(run, config_name="predict")
