"""Per-patient validation metrics of a checkpoint: `python evaluate.py ckpt_path=PATH`."""

from prostate_seg.commands import evaluate

if __name__ == "__main__":
    evaluate()
