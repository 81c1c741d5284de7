"""The report's figures, built without pyplot (no global state, no GUI backend, safe in a
training process): axis labels, a key for colours and markers, axes fitted to the data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from prostate_seg.study.statistics import Analysis, Row

PAD = 0.04  # share of the data range added on each side of an axis


def loss_colours(losses: Sequence[str], alphas: dict[str, float]) -> dict[str, Any]:
    """BCE grey; a loss with an alpha red, lighter for higher alpha, dark red at 0.5 (Dice)."""
    others = iter(matplotlib.colormaps["tab10"].colors)
    colours = {}
    for loss in losses:
        alpha = alphas.get(loss, math.nan)
        if loss.split(" ")[0] == "bce":
            colours[loss] = "0.35"
        elif np.isfinite(alpha) and math.isclose(alpha, 0.5):
            colours[loss] = "darkred"
        elif np.isfinite(alpha):
            colours[loss] = matplotlib.colormaps["Reds_r"](0.1 + 0.7 * alpha)
        else:
            colours[loss] = next(others, "tab:blue")
    return colours


def fit_axis(values: Sequence[float]) -> tuple[float, float]:
    """Limits holding every finite value with a margin (never cut at a guessed floor)."""
    data = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(data) == 0:
        return 0.0, 1.0
    low, high = float(data.min()), float(data.max())
    margin = max(high - low, 0.02) * PAD + 1e-3
    return low - margin, high + margin


def _loss_axis(ax: Any, losses: Sequence[str]) -> None:
    ax.set_xticks(range(len(losses)), losses, rotation=40, ha="right", fontsize=8)
    ax.set(xlabel="loss (colour: BCE grey; Tversky red, lighter = higher α)",
           xlim=(-0.6, len(losses) - 0.4))


def scores(rows: list[Row], a: Analysis, colours: dict[str, Any]) -> Figure:
    """Dice, precision and recall per loss: every patient × seed a point, the mean on top (Dice
    with its 95 % CI); panels without values are left out."""
    losses = [s.loss for s in a.summaries]
    metrics = [m for m in ("dice", "precision", "recall")
               if any(np.isfinite(r.get(m, math.nan)) for r in rows)]
    figure = Figure(figsize=(4.6 * len(metrics), 4.2), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)
    jitter = np.random.default_rng(0)
    for ax, metric in zip(axes.flat, metrics):
        shown: list[float] = []
        for i, loss in enumerate(losses):
            values = np.array([r.get(metric, math.nan) for r in rows if r["loss"] == loss])
            values = values[np.isfinite(values)]
            ax.scatter(i + jitter.uniform(-0.18, 0.18, len(values)), values, s=10,
                       color=colours[loss], alpha=0.6, edgecolor="none", zorder=2)
            shown += list(values)
            if len(values):
                ax.scatter([i], [values.mean()], marker="D", s=30, color="k", zorder=3)
        if metric == "dice":
            for i, s in enumerate(a.summaries):
                if np.isfinite(s.dice_ci_low):
                    ax.vlines(i, s.dice_ci_low, s.dice_ci_high, color="k", lw=1.5, zorder=3)
        ax.set(ylim=fit_axis(shown), ylabel=f"{metric} per patient (per volume)",
               title=metric.capitalize())
        _loss_axis(ax, losses)
        ax.grid(axis="y", alpha=0.3)
    key = [Line2D([], [], ls="", marker="o", color="0.5",
                  label="one patient × seed (colour = loss)"),
           Line2D([], [], ls="", marker="D", color="k", label="mean over patient × seed rows"),
           Line2D([], [], color="k", lw=1.5, label="Dice: 95 % CI of the mean (runs and patients)")]
    figure.legend(handles=key, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"{a.split} patients: every point shown")
    return figure


def paired(a: Analysis, colours: dict[str, Any]) -> Figure:
    """Each patient's Dice across losses joined by a line: the pairing the comparisons use."""
    losses = [s.loss for s in a.summaries]
    patients = sorted({p for d in a.patient_dice.values() for p in d})
    figure = Figure(figsize=(max(5.0, 0.9 * len(losses) + 2), 4.6), layout="constrained")
    ax = figure.subplots()
    lines = [[(i, a.patient_dice[loss][patient]) for i, loss in enumerate(losses)
              if patient in a.patient_dice[loss]] for patient in patients]
    ax.add_collection(LineCollection(lines, colors="0.6", linewidths=0.7, alpha=0.6, zorder=1))
    shown: list[float] = []
    for i, loss in enumerate(losses):
        values = list(a.patient_dice[loss].values())
        shown += values
        ax.scatter([i] * len(values), values, s=14, color=colours[loss], zorder=2)
        ax.scatter([i], [np.mean(values)], marker="D", s=40, color="k", zorder=3)
    ax.set(ylim=fit_axis(shown), ylabel="per-patient Dice (mean over seeds)",
           title=f"{len(patients)} {a.split} patients, each joined across losses")
    _loss_axis(ax, losses)
    ax.legend(handles=[
        Line2D([], [], color="0.6", marker="o", markerfacecolor="0.4", lw=0.7,
               label="one patient (colour = loss)"),
        Line2D([], [], ls="", marker="D", color="k", label="mean over patients")],
        fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    return figure


def forest(a: Analysis) -> Figure:
    """Each comparison's difference with its 95 % CI: filled significant, open not, grey flagged."""
    comparisons = a.comparisons
    figure = Figure(figsize=(7.0, 0.45 * len(comparisons) + 1.8), layout="constrained")
    ax = figure.subplots()
    for y, c in enumerate(reversed(comparisons)):
        grey = a.is_flagged(c)
        colour = "0.6" if grey else ("tab:red" if c.mean_diff < 0 else "tab:blue")
        if np.isfinite(c.ci_low):
            ax.hlines(y, c.ci_low, c.ci_high, color=colour, lw=2)
        ax.plot([c.mean_diff], [y], marker="o", ms=7, color=colour,
                markerfacecolor=colour if c.significant and not grey else "white")
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(comparisons)),
                  [f"{c.loss} − {c.baseline}" for c in reversed(comparisons)], fontsize=8)
    values = [v for c in comparisons for v in (0.0, c.mean_diff, c.ci_low, c.ci_high)]
    ax.set(xlim=fit_axis(values), ylim=(-0.7, len(comparisons) - 0.3), ylabel="comparison",
           xlabel="Δ per-patient Dice (first loss − second), 95 % CI of each (not adjusted), "
                  "runs as replicates",
           title=f"Paired differences on {a.split} patients (Holm over {len(comparisons)})")
    ax.legend(handles=[
        Line2D([], [], marker="o", color="tab:blue", label="significant after Holm (filled)"),
        Line2D([], [], marker="o", color="tab:blue", markerfacecolor="white",
               label="no difference detected (open)"),
        Line2D([], [], marker="o", color="0.6", markerfacecolor="white",
               label="flagged loss: not interpreted"),
        Line2D([], [], color="k", ls="--", lw=0.8, label="no difference")],
        fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    return figure


@dataclass
class ContourColumn:
    label: str
    run: str
    dice: float  # the run's mean validation Dice over its patients
    image: np.ndarray  # (slices, H, W)
    mask: np.ndarray
    prob: np.ndarray
    names: np.ndarray


def _slice_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def _outline(ax: Any, mask: np.ndarray, colour: str, width: float) -> None:
    """Contour of a mask padded with background, so a mask filling the slice still has one."""
    padded = np.pad(mask.astype(float), 1)
    rows, cols = np.arange(-1, mask.shape[0] + 1), np.arange(-1, mask.shape[1] + 1)
    ax.contour(cols, rows, padded, levels=[0.5], colors=colour, linewidths=width)


def contours(columns: list[ContourColumn]) -> Figure:
    """Preview slices × truth and each loss's prediction (red fill and outline over the green
    truth outline); an empty prediction says so in words."""
    slices = min(len(c.image) for c in columns)
    figure = Figure(figsize=(2.3 * (len(columns) + 1), 2.5 * slices + 0.6), layout="constrained")
    axes = figure.subplots(slices, len(columns) + 1, squeeze=False)
    reference = columns[0]
    red = ListedColormap(["red"])
    for row in range(slices):
        truth = reference.mask[row] > 0
        ax = axes[row, 0]
        ax.imshow(reference.image[row].astype(float), cmap="gray")
        _outline(ax, truth, "lime", 1.0)
        ax.set_title("truth", fontsize=7)
        ax.set_ylabel(str(reference.names[row]), fontsize=7)
        for ax, column in zip(axes[row, 1:], columns):
            truth = column.mask[row] > 0
            pred = column.prob[row].astype(float) > 0.5
            ax.imshow(column.image[row].astype(float), cmap="gray")
            _outline(ax, truth, "lime", 0.8)
            if pred.any():
                ax.imshow(np.ma.masked_where(~pred, pred), cmap=red, alpha=0.35,
                          vmin=0, vmax=1)
                _outline(ax, pred, "red", 1.0)
            else:
                ax.text(0.5, 0.5, "predicted\nnothing", color="red", ha="center",
                        va="center", transform=ax.transAxes, fontsize=9, weight="bold")
            title = f"slice Dice {_slice_dice(pred, truth):.3f}"
            if row == 0:
                title = f"{column.label}\nval Dice {column.dice:.3f}\n{title}"
            ax.set_title(title, fontsize=7)
    for ax in axes.flat:  # the outline of a full mask lies on the image's edge: keep it in
        height, width = reference.image.shape[1:]
        ax.set(xlim=(-0.5, width - 0.5), ylim=(height - 0.5, -0.5), xticks=[], yticks=[])
    figure.legend(handles=[Line2D([], [], color="lime", label="truth outline"),
                           Patch(facecolor=(1, 0, 0, 0.35), edgecolor="red",
                                 label="prediction (prob > 0.5)")],
                  loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle("Validation slices; 'val Dice' = the model's mean per-patient Dice, "
                    "'slice Dice' = this slice", fontsize=8)
    return figure


@dataclass
class Curve:
    name: str  # e.g. "fold 0, seed 1"
    history: list[dict[str, float]]  # metrics.csv rows
    best_epoch: float | None


def loss_curves(curves: dict[str, list[Curve]], colours: dict[str, Any]) -> Figure:
    """One panel per loss: each run's training and selection loss, the chosen epoch marked."""
    labels = list(curves)
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    figure = Figure(figsize=(4.2 * cols, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    palette = matplotlib.colormaps["tab10"].colors
    for ax, label in zip(axes.flat, labels):
        for i, curve in enumerate(curves[label]):
            colour = palette[i % len(palette)]
            for key, style in (("train/loss", "-"), ("select/loss", "--")):
                points = [(h["epoch"], h[key]) for h in curve.history if "epoch" in h and key in h]
                if points:
                    ax.plot(*zip(*points), style, color=colour, lw=1,
                            label=curve.name if key == "select/loss" else None)
            best = [h["select/loss"] for h in curve.history
                    if h.get("epoch") == curve.best_epoch and "select/loss" in h]
            if best:
                ax.plot([curve.best_epoch], best[:1], marker="*", ms=9, color=colour, ls="")
        ax.set_title(label, fontsize=9, color=colours.get(label, "k"))
        ax.set(xlabel="epoch", ylabel="loss")
        handles, names = ax.get_legend_handles_labels()
        style = [Line2D([], [], color="k", label="train"),
                 Line2D([], [], color="k", ls="--", label="selection"),
                 Line2D([], [], color="k", marker="*", ls="", label="chosen epoch")]
        runs = list(zip(handles, names))[:8]
        ax.legend(handles=[h for h, _ in runs] + style, fontsize=6, loc="best",
                  title=None if len(handles) <= 8 else f"{len(handles)} runs, 8 named",
                  title_fontsize=6)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    return figure


def alpha_curve(a: Analysis, colours: dict[str, Any]) -> Figure:
    """Each alpha's mean Dice with its 95 % CI, the baseline a band, flagged losses grey crosses,
    a star only on the verdict's best; the y-axis holds the intervals, so a tiny spread between
    means is not drawn as a landscape."""
    with_alpha = sorted((s for s in a.summaries if np.isfinite(s.alpha)), key=lambda s: s.alpha)
    flagged = a.flagged
    best = next((line.split(":")[1].split(",")[0].strip() for line in a.verdict
                 if line.startswith("Best: ")), None)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    shown: list[float] = []
    base = next((s for s in a.summaries if s.loss == a.baseline), None)
    if base is not None and base.loss not in flagged:
        ax.axhspan(base.dice_ci_low, base.dice_ci_high, color="0.85", zorder=0,
                   label=f"{base.loss}: 95 % CI")
        ax.axhline(base.dice_mean, color="0.4", lw=1, label=f"{base.loss}: mean")
        shown += [base.dice_ci_low, base.dice_ci_high]
    for s in with_alpha:
        grey = s.loss in flagged
        colour = "0.6" if grey else colours.get(s.loss, "C0")
        if np.isfinite(s.dice_ci_low):
            ax.vlines(s.alpha, s.dice_ci_low, s.dice_ci_high, color=colour, lw=2)
            shown += [s.dice_ci_low, s.dice_ci_high]
        ax.plot(s.alpha, s.dice_mean, "x" if grey else "o", color=colour, ms=7)
        shown.append(s.dice_mean)
    clean = [s for s in with_alpha if s.loss not in flagged]
    ax.plot([s.alpha for s in clean], [s.dice_mean for s in clean], "-", color="0.5", lw=0.8)
    if best is not None:
        star = next((s for s in with_alpha if s.loss == best), None)
        if star is not None:
            ax.plot(star.alpha, star.dice_mean, "*", color="gold", mec="k", ms=16, zorder=4,
                    label=f"best (survives Holm): {best}")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", color="C3", label="mean per-patient Dice, 95 % CI"),
                Line2D([], [], marker="x", ls="", color="0.6", label="flagged: not interpreted")]
    ax.legend(handles=handles, loc="best", fontsize=7)
    ax.set(xlabel="Tversky alpha (weight of false positives; beta = 1 - alpha)",
           ylabel=f"per-patient Dice ({a.split}), mean and 95 % CI", xlim=(0, 1),
           ylim=fit_axis(shown))
    ax.set_title(("Best: " + best if best else "No alpha is called best (see the verdict)")
                 + "; each mean's CI here, the paired differences in forest.png", fontsize=8)
    ax.grid(alpha=0.3)
    return figure
