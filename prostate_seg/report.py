"""Turn a sweep folder into the study's results table and figures.

``python -m prostate_seg.report SWEEP_DIR`` (also run automatically at the end of every
multirun) writes ``SWEEP_DIR/report/``: results.md, results.csv, loss_curves.png,
precision_recall.png, dice_f1.png and contours.png.

Every number is read from the files the runs wrote (results.json, metrics.csv,
val_preview.npz); runs that failed or did not finish are listed, never silently dropped.
Each loss is summarised over its seeds as mean +- standard deviation with a 95 % confidence
interval (Student t), and one line says whether the best loss's lead exceeds the seed spread.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from scipy import stats

import prostate_seg.config  # noqa: F401  (the ps.* resolvers that loss names use)
from prostate_seg.files import write_csv, write_text
from prostate_seg.runs import METRICS_FILE, PREVIEW_FILE, RESULTS_FILE, STATUS_FILE, read_json

log = logging.getLogger(__name__)

# (results.json key, column title); higher is better for all of them.
METRICS = (
    ("val/dice", "Dice (per volume)"),
    ("val/dice_global", "Dice (pooled)"),
    ("val/precision", "Precision"),
    ("val/recall", "Recall"),
    ("val/f1", "F1 (pooled)"),
)
SIGNIFICANCE = 0.05


@dataclass
class Run:
    folder: Path
    loss: str
    alpha: float | None
    seed: int | None
    status: str  # completed | failed | unfinished
    error: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _status(folder: Path) -> tuple[str, str | None]:
    launcher = read_json(folder / "launcher.json") or {}
    status = read_json(folder / STATUS_FILE) or {}
    if (folder / RESULTS_FILE).exists() and status.get("status") == "completed":
        return "completed", None
    if status.get("status") == "failed" or launcher.get("status") == "failed":
        error = status.get("error") or (launcher.get("error") or "").strip().splitlines()[-1:]
        return "failed", error if isinstance(error, str) else " ".join(error)
    return "unfinished", f"status: {status.get('status', 'no status.json')}"


def _history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def collect_runs(sweep_dir: Path) -> list[Run]:
    """Every job folder under ``sweep_dir`` (a folder holding ``.hydra/config.yaml``)."""
    runs = []
    for config_path in sorted(sweep_dir.glob("**/.hydra/config.yaml")):
        folder = config_path.parent.parent
        if "report" in folder.relative_to(sweep_dir).parts:
            continue
        cfg = OmegaConf.load(config_path)
        loss = cfg.get("loss", {})
        try:
            name = str(OmegaConf.select(cfg, "loss.name", default=folder.name))
        except Exception:  # noqa: BLE001 - an unresolvable interpolation: name it by its folder
            name = folder.name
        status, error = _status(folder)
        runs.append(Run(folder=folder, loss=name, alpha=loss.get("alpha"),
                        seed=cfg.get("seed"), status=status, error=error,
                        results=read_json(folder / RESULTS_FILE) or {},
                        history=_history(folder / METRICS_FILE)))
    return runs


def _loss_order(name: str) -> tuple[int, float, str]:
    if name == "bce":
        return (0, 0.0, name)
    match = re.fullmatch(r"tversky_a([0-9.]+)(_b[0-9.]+)?", name)
    return (1, float(match.group(1)), name) if match else (2, 0.0, name)


def group_by_loss(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.loss, []).append(run)
    return {k: groups[k] for k in sorted(groups, key=_loss_order)}


def summarize(values: list[float], bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean, sample std and 95 % t-interval of one loss's per-seed values (the interval
    clipped to ``bounds`` for bounded scores: with 2 seeds, t = 12.7 reaches past 0 and 1)."""
    arr = np.asarray(values, dtype=float)
    n = len(arr)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(arr.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(arr.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"n": n, "mean": mean, "std": std, "ci_low": low, "ci_high": high}


def build_table(groups: dict[str, list[Run]]) -> list[dict[str, Any]]:
    rows = []
    for loss, runs in groups.items():
        done = [r for r in runs if r.status == "completed"]
        row: dict[str, Any] = {
            "loss": loss,
            "alpha": runs[0].alpha,
            "completed": len(done),
            "failed": sum(r.status == "failed" for r in runs),
            "unfinished": sum(r.status == "unfinished" for r in runs),
            "values": {key: [float(r.results[key]) for r in done if key in r.results]
                       for key, _ in METRICS},
        }
        for key, _ in METRICS:
            row[key] = summarize(row["values"][key], bounds=(0.0, 1.0))
        row["epochs"] = summarize([float(r.results.get("epochs_trained", math.nan)) for r in done])
        rows.append(row)
    return rows


def significance_line(rows: list[dict[str, Any]], key: str = "val/dice") -> str:
    """One sentence: is the best loss ahead of the others by more than the seed spread?"""
    scored = [r for r in rows if r[key]["n"] > 0]
    if len(scored) < 2:
        return "Fewer than two losses have completed runs: nothing to compare."
    best = max(scored, key=lambda r: r[key]["mean"])
    others = [r for r in scored if r is not best]
    if min(r[key]["n"] for r in scored) < 2:
        return (f"Best per-volume Dice: {best['loss']} ({best[key]['mean']:.4f}); with a single "
                "seed for some losses the seed spread is unknown, so no difference can be called "
                "real (run seed=0,1,2).")
    beaten, not_beaten = [], []
    for other in others:
        p = stats.ttest_ind(best["values"][key], other["values"][key], equal_var=False).pvalue
        (beaten if p < SIGNIFICANCE else not_beaten).append(f"{other['loss']} (p={p:.2g})")
    verdict = (f"its lead over {len(beaten)} of {len(others)} other losses exceeds the seed "
               f"spread (Welch t-test, p < {SIGNIFICANCE})")
    if not_beaten:
        verdict += f"; over {', '.join(not_beaten)} it does not"
    return f"Best per-volume Dice: {best['loss']} ({best[key]['mean']:.4f}); {verdict}."


def _cell(summary: dict[str, float], bold: bool) -> str:
    if summary["n"] == 0:
        return "—"
    text = f"{summary['mean']:.4f}"
    if summary["n"] > 1:
        text += f" ± {summary['std']:.4f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"
    return f"**{text}**" if bold else text


def write_tables(rows: list[dict[str, Any]], runs: list[Run], out: Path) -> str:
    best = {key: max((r[key]["mean"] for r in rows if r[key]["n"]), default=None)
            for key, _ in METRICS}
    header = ["Loss", *[title for _, title in METRICS], "Epochs", "Runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["loss"]]
        for key, _ in METRICS:
            cells.append(_cell(row[key], row[key]["n"] > 0 and row[key]["mean"] == best[key]))
        epochs = row["epochs"]
        cells.append("—" if epochs["n"] == 0 else f"{epochs['mean']:.1f}")
        runs_cell = f"{row['completed']} done"
        if row["failed"]:
            runs_cell += f", {row['failed']} FAILED"
        if row["unfinished"]:
            runs_cell += f", {row['unfinished']} unfinished"
        cells.append(runs_cell)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    problems = [r for r in runs if r.status != "completed"]
    md = [
        f"# Results: {out.parent}",
        "",
        "Validation metrics of each run's best checkpoint (by per-volume Dice), over seeds: "
        "mean ± std [95 % CI]. Best mean of each column in bold.",
        "",
        table,
        "",
        significance_line(rows),
        "",
        "Per-volume Dice pools each patient's slices and averages over patients (the headline "
        "number). Pooled pixel F1 equals pooled Dice by definition (2PR/(P+R) = 2TP/(2TP+FP+FN)); "
        "the original study's Dice and F1 differed only because its Dice was averaged per batch.",
        "",
        "![loss curves](loss_curves.png)",
        "![precision and recall](precision_recall.png)",
        "![dice and f1](dice_f1.png)",
        "![contours](contours.png)",
    ]
    if problems:
        md += ["", "## Runs that did not complete", ""]
        md += [f"- `{r.folder.name}`: {r.status}" + (f" — {r.error}" if r.error else "")
               for r in problems]
    text = "\n".join(md) + "\n"
    write_text(out / "results.md", text)

    fields = ["loss", "alpha", "completed", "failed", "unfinished"]
    for key, _ in METRICS:
        fields += [f"{key}_{s}" for s in ("mean", "std", "ci_low", "ci_high")] + [f"{key}_best"]
    fields += ["epochs_mean", "epochs_std"]
    flat_rows = []
    for row in rows:
        flat = {k: row[k] for k in fields[:5]}
        for key, _ in METRICS:
            for s in ("mean", "std", "ci_low", "ci_high"):
                flat[f"{key}_{s}"] = row[key][s]
            flat[f"{key}_best"] = int(row[key]["n"] > 0 and row[key]["mean"] == best[key])
        flat["epochs_mean"], flat["epochs_std"] = row["epochs"]["mean"], row["epochs"]["std"]
        flat_rows.append(flat)
    write_csv(out / "results.csv", flat_rows, fields)
    return table


def _colour(loss: str, alpha: float | None):
    import matplotlib

    if loss == "bce" or alpha is None:
        return "0.35"
    if math.isclose(alpha, 0.5):
        return "darkred"
    return matplotlib.colormaps["Reds_r"](0.1 + 0.7 * alpha)  # lighter for higher alpha


def plot_figures(groups: dict[str, list[Run]], rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    # Loss curves: one panel per loss, one line per seed.
    cols = min(4, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, squeeze=False,
                             figsize=(4 * cols, 3 * math.ceil(len(names) / cols)))
    for ax, name in zip(axes.flat, names):
        for run in groups[name]:
            epochs = [h["epoch"] for h in run.history]
            for key, style in (("train/loss", "-"), ("val/loss", "--")):
                values = [h.get(key, math.nan) for h in run.history]
                ax.plot(epochs, values, style, label=f"{key.split('/')[0]} s{run.seed}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    for filename, keys in (("precision_recall.png", ("val/precision", "val/recall")),
                           ("dice_f1.png", ("val/dice", "val/f1"))):
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.8), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            x = np.arange(len(rows))
            means = [r[key]["mean"] for r in rows]
            errors = [0.0 if math.isnan(r[key]["std"]) else r[key]["std"] for r in rows]
            colours = [_colour(r["loss"], r["alpha"]) for r in rows]
            ax.bar(x, means, yerr=errors, color=colours, capsize=3)
            for i, r in enumerate(rows):  # every seed as a dot: the spread is visible
                ax.scatter([i] * len(r["values"][key]), r["values"][key], color="k", s=8, zorder=3)
            ax.set_xticks(x, [r["loss"] for r in rows], rotation=45, ha="right", fontsize=8)
            ax.set_title(dict(METRICS)[key])
            finite = [m for m in means if not math.isnan(m)]
            ax.set_ylim(max(0.0, min(finite, default=0) - 0.1), 1.0)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)

    _plot_contours(groups, out, plt)


def _plot_contours(groups: dict[str, list[Run]], out: Path, plt: Any) -> None:
    """One validation slice: the truth, then each loss's predicted contour over it."""
    previews = {}
    for name, runs in groups.items():
        for run in sorted(runs, key=lambda r: (r.seed is None, r.seed)):
            path = run.folder / PREVIEW_FILE
            if run.status == "completed" and path.exists():
                with np.load(path) as data:
                    previews[name] = {k: data[k] for k in data.files}
                break
    panels = len(previews) + 1
    cols = min(5, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    axes = axes.flatten()
    if previews:
        first = next(iter(previews.values()))
        image, truth = first["image"][0].astype(float), first["mask"][0]
        axes[0].imshow(image, cmap="gray")
        axes[0].contour(truth, levels=[0.5], colors="lime", linewidths=1)
        axes[0].set_title(f"truth\n{first['names'][0]}", fontsize=7)
        for ax, (name, preview) in zip(axes[1:], previews.items()):
            ax.imshow(image, cmap="gray")
            ax.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
            if (preview["prob"][0] > 0.5).any():
                ax.contour(preview["prob"][0].astype(float), levels=[0.5], colors="red",
                           linewidths=1)
            ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "contours.png", dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path) -> Path:
    """Write SWEEP_DIR/report/ and return its results.md path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: sweep folder not found")
    runs = collect_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no run folders (.hydra/config.yaml) inside")
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    groups = group_by_loss(runs)
    rows = build_table(groups)
    table = write_tables(rows, runs, out)
    plot_figures(groups, rows, out)
    print(table)
    print(significance_line(rows))
    print(f"report: {out / 'results.md'}\nTensorBoard: tensorboard --logdir {sweep_dir}")
    return out / "results.md"


class SweepReportCallback(Callback):
    """Hydra callback: write the report when a multirun ends. Hydra skips ``on_multirun_end``
    when a job failed, so the report is also written at exit in that case."""

    def __init__(self) -> None:
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report()

    def _report(self) -> None:
        if self._sweep_dir is None:
            return
        sweep_dir, self._sweep_dir = self._sweep_dir, None
        try:
            write_report(sweep_dir)
        except Exception as exc:  # noqa: BLE001 - a report problem must not hide the sweep's
            log.error("could not write the sweep report for %s: %s", sweep_dir, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prostate_seg.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/sweeps/DATE/TIME")
    args = parser.parse_args(argv)
    try:
        write_report(args.sweep_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
