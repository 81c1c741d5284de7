"""Per-patient validation metrics of a checkpoint: `python evaluate.py ckpt_path=PATH`."""

from prostate_seg.cli import hydra_entry
from prostate_seg.evaluate import run

if __name__ == "__main__":
    hydra_entry(run, config_name="evaluate")
