"""Segment new scans: `python predict.py ckpt_path=CKPT input=SCAN.nii.gz output=MASK.nii.gz`."""

from prostate_seg.cli import predict

if __name__ == "__main__":
    predict()
