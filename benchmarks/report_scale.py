"""Time and peak memory of `python -m prostate_seg report --table` as the table grows.

    python benchmarks/report_scale.py [--patients 1000 10000 50000]

Each table: 3 losses x 5 folds x 5 seeds x PATIENTS patients with every column a sweep's long
table has; the report runs in a fresh process, whose wall time and peak resident memory are
printed (the bar: 50,000 patients within 2 minutes and 2 GB on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LOSSES = (("bce", ""), ("tversky_a0.25", 0.25), ("tversky_a0.5", 0.5))
FOLDS, SEEDS = 5, 5


def write_table(path: Path, patients: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    block = np.arange(patients) % FOLDS
    base = rng.normal(0.82, 0.08, patients)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["loss", "alpha", "beta", "fold", "seed", "patient", "split", "dice",
                         "precision", "recall", "hd95", "hd95_failed", "hd95_unit",
                         "voxels_pred", "voxels_true", "voxels_total", "best_epoch",
                         "epochs_trained", "max_epochs", "stopped_early", "run"])
        for loss, alpha in LOSSES:
            beta = "" if alpha == "" else round(1 - alpha, 2)
            shifts = rng.normal(0, 0.02, (SEEDS, FOLDS))
            for s in range(SEEDS):
                dice = np.clip(base + shifts[s, block] + rng.normal(0, 0.03, patients), 0, 1)
                for p in range(patients):
                    d = round(float(dice[p]), 5)
                    writer.writerow([loss, alpha, beta, block[p], s, f"p{p:06d}", "val", d,
                                     min(1, d + 0.03), max(0, d - 0.03), round(20 * (1 - d), 2),
                                     0, "px", 900, 1000, 250000, 12, 20, 40, "true",
                                     f"{loss}-fold{block[p]}-seed{s}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args()
    print(f"{'patients':>9} {'rows':>9} {'table MB':>9} {'seconds':>8} {'peak GB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for patients in args.patients:
            table = Path(tmp) / f"t{patients}.csv"
            write_table(table, patients)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            started = time.time()
            result = subprocess.run([sys.executable, "-m", "prostate_seg", "report", "--table",
                                     str(table), "--out", str(Path(tmp) / f"out{patients}")],
                                    capture_output=True, text=True)
            seconds = time.time() - started
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                return 1
            # ru_maxrss of children is the largest child so far (kB): runs go from small to large
            print(f"{patients:>9,} {len(LOSSES) * SEEDS * patients:>9,} "
                  f"{table.stat().st_size / 1e6:>9.1f} {seconds:>8.1f} "
                  f"{max(peak, before) / 1e6:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
