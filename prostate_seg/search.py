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
    """:func:`by_alpha` of the runs in ``sweep_dir`` (their ``results.json``)."""
    return by_alpha([(path.parent.name, read_json(path) or {})
                     for path in sorted(Path(sweep_dir).glob(f"*/{RESULTS_FILE}"))], objective)


def by_alpha(runs: list[tuple[str, dict[str, Any]]],
             objective: str = OBJECTIVE) -> list[dict[str, Any]]:
    """One row per alpha, sorted by alpha, from (folder, results) pairs: the runs (fold, seed,
    value) and their mean. Runs without an alpha (BCE) or without the objective (failed,
    unfinished) are left out."""
    grouped: dict[float, list[dict[str, Any]]] = {}
    for folder, results in runs:
        alpha, value = results.get("alpha"), results.get(objective)
        if isinstance(alpha, (int, float)) and isinstance(value, (int, float)):
            grouped.setdefault(float(alpha), []).append(
                {"folder": folder, "fold": results.get("fold"), "seed": results.get("seed"),
                 "value": float(value)})
    return [{"alpha": alpha, "runs": runs, "mean": math.fsum(r["value"] for r in runs) / len(runs)}
            for alpha, runs in sorted(grouped.items())]


def plot_alpha_search(sweep_dir: Path, out_dir: Path, objective: str = OBJECTIVE) -> Path | None:
    """``out_dir/alpha_search.png`` (:func:`prostate_seg.figures.alpha_curve`); None when the
    folder holds fewer than two alphas. The sweep report draws it too."""
    from prostate_seg import figures  # matplotlib only to draw: every training run imports OBJECTIVE

    rows = alpha_table(sweep_dir, objective)
    if len(rows) < 2:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FIGURE
    figures.save(figures.alpha_curve(rows, objective), path)
    return path
