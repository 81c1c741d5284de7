"""Per-patient validation metrics of a checkpoint: `python evaluate.py ckpt_path=PATH`."""

from prostate_seg.cli import evaluate

if __name__ == "__main__":
    evaluate()
