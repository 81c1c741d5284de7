"""Where each patient's gland lands on the grey scale the network sees, to tell whether a patient
that scores poorly was put off by the intensity normalisation (issue 24: centres and coils).

    python benchmarks/grey_levels.py PREPARED_DIR

Reads what ``prepare`` wrote (manifest.csv, the PNG slices and masks) and prints, per patient,
the gland's median grey level with its 10th and 90th percentiles, the share of gland pixels the
window saturated (255), and the median grey of the slices' other pixels; then the patients whose
gland median lies outside Tukey's fences of all patients' (1.5 interquartile ranges beyond the
quartiles).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np


def read_png(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise SystemExit(f"{path}: not a readable PNG")
    return pixels


def grey_levels(prepared: Path) -> dict[str, dict[str, float]]:
    """Per patient: gland median, p10, p90, saturated share, and the other pixels' median."""
    manifest = prepared / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found (is {prepared} a folder `prepare` wrote?)")
    gland: dict[str, list[np.ndarray]] = {}
    other: dict[str, list[np.ndarray]] = {}
    with manifest.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                patient, image, mask = row["patient"], row["image"], row["mask"]
            except KeyError as exc:
                raise SystemExit(f"{manifest}: line {line} has no {exc} column") from None
            pixels, inside = read_png(prepared / image), read_png(prepared / mask) > 0
            if inside.any():
                gland.setdefault(patient, []).append(pixels[inside])
                other.setdefault(patient, []).append(pixels[~inside])
    if not gland:
        raise SystemExit(f"{manifest}: no slice has gland in its mask")
    levels = {}
    for patient in sorted(gland):
        g, o = np.concatenate(gland[patient]), np.concatenate(other[patient])
        p10, median, p90 = np.percentile(g, [10, 50, 90])
        levels[patient] = {"median": median, "p10": p10, "p90": p90,
                           "saturated": float(np.mean(g == 255)), "other": float(np.median(o))}
    return levels


def outliers(levels: dict[str, dict[str, float]]) -> list[str]:
    """Patients whose gland median lies outside Tukey's fences of all patients' medians."""
    q1, q3 = np.percentile([v["median"] for v in levels.values()], [25, 75])
    low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    return [p for p, v in levels.items() if not low <= v["median"] <= high]


def markdown(levels: dict[str, dict[str, float]]) -> str:
    lines = ["| patient | gland median (p10 - p90) | gland saturated | other pixels' median |",
             "|---|---|---|---|"]
    lines += [f"| {p} | {v['median']:.0f} ({v['p10']:.0f} - {v['p90']:.0f}) | "
              f"{100 * v['saturated']:.1f} % | {v['other']:.0f} |" for p, v in levels.items()]
    medians = [v["median"] for v in levels.values()]
    lines += ["", f"Gland median over {len(levels)} patients: {np.median(medians):.0f} "
              f"(range {min(medians):.0f} - {max(medians):.0f}); outside Tukey's fences: "
              f"{', '.join(outliers(levels)) or 'none'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path, help="a folder written by `prepare`")
    print(markdown(grey_levels(parser.parse_args(argv).prepared)))


if __name__ == "__main__":
    sys.exit(main())
