"""Where each patient's gland lands on the grey scale the network sees, to tell whether a patient
that scores poorly was put off by the intensity normalisation (issue 24: centres and coils).

    python benchmarks/grey_levels.py PREPARED_DIR

Reads what ``prepare`` wrote (manifest.csv, the PNG slices and masks) and prints, per patient,
the gland's median grey level with its 10th and 90th percentiles, the share of gland pixels the
window saturated (255), and the median grey of the slices' other pixels; then the patients whose
gland median lies outside Tukey's fences of all patients' (1.5 interquartile ranges beyond the
quartiles). With ``--scores``, evaluate's per_patient.csv of each fold, it adds each patient's
Dice and the rank correlation of gland grey level with Dice: if the window put some patients
off, the darker or brighter glands score lower.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prostate_seg.data.dataset import check_files, read_manifest, read_png  # noqa: E402
from prostate_seg.errors import DataError  # noqa: E402
from prostate_seg.study.report import read_long_table  # noqa: E402


def grey_levels(prepared: Path) -> dict[str, dict[str, float]]:
    """Per patient: gland median, p10, p90, saturated share, and the median of the other pixels
    of the slices that hold gland (the gland's surroundings, not the empty slices beyond it).
    The slices are read and checked as training reads them: what the network sees."""
    try:
        records = read_manifest(prepared)
        check_files(records, None)
        gland: dict[str, list[np.ndarray]] = {}
        other: dict[str, list[np.ndarray]] = {}
        for record in records:
            inside = read_png(record.mask) > 0
            if inside.any():
                pixels = read_png(record.image)
                gland.setdefault(record.patient, []).append(pixels[inside])
                other.setdefault(record.patient, []).append(pixels[~inside])
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    levels = {}
    for patient in sorted(gland):
        g, o = np.concatenate(gland[patient]), np.concatenate(other[patient])
        p10, median, p90 = np.percentile(g, [10, 50, 90])
        levels[patient] = {"median": median, "p10": p10, "p90": p90,
                           "saturated": float(np.mean(g == 255)),
                           "other": float(np.median(o)) if o.size else float("nan")}
    return levels


def outliers(levels: dict[str, dict[str, float]]) -> list[str]:
    """Patients whose gland median lies outside Tukey's fences of all patients' medians: the
    quartiles, unlike a mean and SD, are not dragged by the outliers they are to find."""
    q1, q3 = np.percentile([v["median"] for v in levels.values()], [25, 75])
    low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    return [p for p, v in levels.items() if not low <= v["median"] <= high]


def scores(paths: list[Path]) -> dict[str, float]:
    """Each patient's Dice from evaluate's per_patient.csv files (one a fold: each patient once)."""
    dice: dict[str, float] = {}
    for path in paths:
        try:
            rows = read_long_table(path, ("patient", "dice"))
        except DataError as exc:
            raise SystemExit(str(exc)) from None
        for row in rows:
            if row["patient"] in dice:
                raise SystemExit(f"{path} line {row['line']}: {row['patient']} is scored in an "
                                 "earlier file too; give one file per fold")
            dice[row["patient"]] = row["dice"]
    return dice


def markdown(levels: dict[str, dict[str, float]], dice: dict[str, float] | None = None) -> str:
    dice = dice or {}
    extra = ("", "") if not dice else (" Dice |", "---|")
    lines = [f"| patient | gland median (p10 - p90) | gland saturated | other pixels' median |"
             f"{extra[0]}", f"|---|---|---|---|{extra[1]}"]
    lines += [f"| {p} | {v['median']:.0f} ({v['p10']:.0f} - {v['p90']:.0f}) | "
              f"{100 * v['saturated']:.1f} % | {v['other']:.0f} |"
              + (f" {dice[p]:.4f} |" if p in dice else " - |" if dice else "")
              for p, v in levels.items()]
    medians = [v["median"] for v in levels.values()]
    lines += ["", f"Gland median over {len(levels)} patients: {np.median(medians):.0f} "
              f"(range {min(medians):.0f} - {max(medians):.0f}); outside Tukey's fences: "
              f"{', '.join(outliers(levels)) or 'none'}."]
    both = [p for p in levels if p in dice]
    if len(both) >= 3:
        rho, p_value = stats.spearmanr([levels[p]["median"] for p in both], [dice[p] for p in both])
        lines.append(f"Rank correlation (Spearman) of gland median with Dice over {len(both)} "
                     f"patients: {rho:+.2f} (p = {p_value:.2g}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path, help="a folder written by `prepare`")
    parser.add_argument("--scores", type=Path, nargs="+", default=[],
                        help="evaluate's per_patient.csv, one a fold")
    args = parser.parse_args(argv)
    print(markdown(grey_levels(args.prepared), scores(args.scores)))


if __name__ == "__main__":
    sys.exit(main())
