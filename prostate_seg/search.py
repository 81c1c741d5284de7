"""Searches over the Tversky alpha (``experiment=alpha_search``, or any sweep of ``loss.alpha``):
the objective that a search maximises, and the objective against alpha from a sweep folder.

Every number comes from the runs' ``results.json`` (alpha, fold, seed and the objective), so
the figure works for an Optuna search and for a grid of alpha values alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prostate_seg.runs import RESULTS_FILE, read_json

# The run's mean per-patient validation Dice at the scan's original size (results.json): what
# the train task returns to a sweeper and what experiment=alpha_search maximises.
OBJECTIVE = "val/dice_original"
FIGURE = "alpha_search.png"


def alpha_table(sweep_dir: Path, objective: str = OBJECTIVE) -> list[dict[str, Any]]:
    """One row per alpha, sorted by alpha: the runs (fold, seed, value) and their mean.
    Runs without an alpha (BCE) or without the objective (failed, unfinished) are left out."""
    by_alpha: dict[float, list[dict[str, Any]]] = {}
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULTS_FILE}")):
        results = read_json(path) or {}
        alpha, value = results.get("alpha"), results.get(objective)
        if isinstance(alpha, (int, float)) and isinstance(value, (int, float)):
            by_alpha.setdefault(float(alpha), []).append(
                {"folder": path.parent.name, "fold": results.get("fold"),
                 "seed": results.get("seed"), "value": float(value)})
    return [{"alpha": alpha, "runs": runs, "mean": math.fsum(r["value"] for r in runs) / len(runs)}
            for alpha, runs in sorted(by_alpha.items())]


def plot_alpha_search(sweep_dir: Path, out_dir: Path, objective: str = OBJECTIVE) -> Path | None:
    """``out_dir/alpha_search.png``: every run's objective against its alpha (dots), the mean
    per alpha (line), the best mean marked. None when the folder holds fewer than two alphas."""
    rows = alpha_table(sweep_dir, objective)
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = max(rows, key=lambda r: r["mean"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["alpha"] for r in rows for _ in r["runs"]],
               [run["value"] for r in rows for run in r["runs"]],
               s=14, color="0.6", label="one run (fold, seed)")
    ax.plot([r["alpha"] for r in rows], [r["mean"] for r in rows], "-o", color="C0", ms=4,
            label="mean per alpha")
    ax.plot(best["alpha"], best["mean"], "*", color="C3", ms=14,
            label=f"best: alpha = {best['alpha']:.3g} ({best['mean']:.4f})")
    ax.set_xlabel("Tversky alpha (weight of false positives)")
    ax.set_ylabel(objective)
    ax.set_xlim(0, 1)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FIGURE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
