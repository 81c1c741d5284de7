"""Accuracy on real scans: PROMISE12 T2 volumes (../shared/data/prostate_t2), one fold.

    python benchmarks/real_data_accuracy.py --setting cpu            # unet_small, 128x128
    python benchmarks/real_data_accuracy.py --setting gpu            # full U-Net, 256x256
    python benchmarks/real_data_accuracy.py --setting cpu --runs recipe   # the headline run only

Prepares the scans (location: $PROSTATE_SEG_DATA, default ../shared/data/prostate_t2) unless
--prepared names a folder made by prepare, trains fold 0 of the stored 5-fold patient split
(split_seed 0: the other folds' patients train, a few of them choose the epoch and
checkpoint), evaluates the best checkpoint per volume on fold 0's held-out patients at their
original size, prints the table and writes it into docs/RESULTS.md (or --results) with the
command, machine, date, time taken and software versions. The whole study, every fold and
loss with its paired statistics, is docs/STUDY.md's.

Runs: ``recipe`` (BCE + Dice loss, cosine lr decay, 2.5D input with one neighbour per side);
``ablations`` (the recipe without each of those three); ``study`` (the original study's
recipe: Dice loss, Adam 1e-4, constant lr, single slices). Every run is evaluated with and
without keeping the largest connected component and with flip test-time augmentation.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prostate_seg.config import compose_config  # noqa: E402
from prostate_seg.inference.evaluate import evaluate_checkpoint  # noqa: E402
from prostate_seg.data.prepare import PrepareSettings, prepare  # noqa: E402
from prostate_seg.study.runs import load_json_object  # noqa: E402
from prostate_seg.training.fit import train  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "prostate_t2"

SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {
        "image_size": 128,
        "budget": "00:00:18:00",  # training stops here at the latest (20 min with the rest)
        "overrides": ["model=unet_small", "trainer=cpu", "data.batch_size=16",
                      "trainer.max_epochs=16"],
    },
    "gpu": {
        "image_size": 256,
        # compile pays off over hours; for a 2-minute run its compile time would dominate
        "budget": "00:00:05:00",
        "overrides": ["model=unet", "trainer=gpu", "model.compile=false", "data.batch_size=16",
                      "trainer.max_epochs=100", "callbacks.last_checkpoint.every_n_epochs=25"],
    },
}
RECIPE = ["loss=bce_tversky", "optimizer.lr=1e-3", "scheduler=cosine", "data.context_slices=1"]
RUNS: dict[str, list[str]] = {
    "recipe": RECIPE,
    "recipe without combined loss (Dice only)": [o if o != "loss=bce_tversky" else "loss=dice"
                                                 for o in RECIPE],
    "recipe without cosine schedule": [o for o in RECIPE if o != "scheduler=cosine"],
    "recipe without 2.5D (single slices)": [o if o != "data.context_slices=1"
                                            else "data.context_slices=0" for o in RECIPE],
    "study recipe (Dice loss, Adam 1e-4)": ["loss=dice", "optimizer.lr=1e-4"],
}
GROUPS = {"recipe": ["recipe"], "ablations": [k for k in RUNS if k.startswith("recipe without")],
          "study": ["study recipe (Dice loss, Adam 1e-4)"]}
EVALUATIONS = (("plain", False, False), ("+LCC", True, False), ("+LCC+TTA", True, True))


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {len(os.sched_getaffinity(0))} CPU cores"
    return f"{platform.processor() or platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores"


def run_one(name: str, overrides: list[str], data_dir: Path, workdir: Path,
            setting: dict[str, Any]) -> dict[str, Any]:
    folder = workdir / name.split(" ")[0] / f"{len(list(workdir.glob('*/*')))}"
    cfg = compose_config("train", [f"data.dir={data_dir}", f"data.image_size={setting['image_size']}",
                                   *setting["overrides"], *overrides,
                                   f"++trainer.max_time={setting['budget']}",
                                   "callbacks.early_stopping.patience=1000",
                                   "callbacks.progress_bar.refresh_rate=0"], folder)
    started = time.time()
    results = train(cfg)
    train_seconds = time.time() - started
    row: dict[str, Any] = {"run": name, "epochs": results["epochs_trained"],
                           "train_min": train_seconds / 60,
                           "select_dice_training": results["select/dice"]}
    for label, keep_largest, tta in EVALUATIONS:
        per_patient = evaluate_checkpoint(results["best_checkpoint"], keep_largest=keep_largest,
                                          tta=tta)
        dice = np.array([p["dice"] for p in per_patient])
        row[label] = (float(dice.mean()), float(dice.std(ddof=1)))
        row[f"{label}_patients"] = per_patient
    print(f"{name}: " + ", ".join(f"{k} {row[k][0]:.4f}" for k, *_ in EVALUATIONS)
          + f" ({row['epochs']} epochs, {row['train_min']:.1f} min)", flush=True)
    return row


def markdown(setting_name: str, rows: list[dict[str, Any]], command: str, seconds: float,
             data_dir: Path) -> str:
    versions = (f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, "
                f"Python {platform.python_version()}")
    lines = [
        f"### {setting_name.upper()} setting",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}; date: {datetime.date.today().isoformat()}; {versions}",
        f"- data: {data_dir} (prepared: {load_json_object(data_dir / 'prepare.json')[0]})",
        f"- total time (prepare, all runs, evaluation): {seconds / 60:.1f} min",
        "",
        f"Per-volume Dice on fold 0's {len(rows[0]['plain_patients'])} held-out patients at "
        "original size, mean ± std over patients (LCC: largest 3D connected component kept; "
        "TTA: left-right flip averaged).",
        "",
        "| run | Dice | Dice +LCC | Dice +LCC+TTA | select/dice (training, network size) | epochs | training min |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k, *_ in EVALUATIONS]
        lines.append(f"| {row['run']} | " + " | ".join(cells)
                     + f" | {row['select_dice_training']:.4f} | {row['epochs']} | {row['train_min']:.1f} |")
    first = rows[0]
    lines += ["", f"Per patient ({first['run']}, +LCC+TTA):", "",
              "| patient | Dice | precision | recall | HD95 |", "|---|---|---|---|---|"]
    for p in first["+LCC+TTA_patients"]:
        lines.append(f"| {p['patient']} | {p['dice']:.4f} | {p['precision']:.4f} | "
                     f"{p['recall']:.4f} | {p['hd95']:.1f} {p['hd95_unit']} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the section between this setting's markers in ``path``."""
    start, end = f"<!-- real_data:{key}:start -->", f"<!-- real_data:{key}:end -->"
    block = f"{start}\n{text}{end}\n"
    content = path.read_text() if path.exists() else "# Results\n\n"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        content = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        content = content.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PROSTATE_SEG_DATA", DEFAULT_DATA)))
    parser.add_argument("--prepared", type=Path, default=None,
                        help="a folder made by prepare at the setting's size (skips prepare)")
    parser.add_argument("--runs", default="recipe,ablations,study",
                        help="comma-separated: recipe, ablations, study")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md")
    parser.add_argument("--max-epochs", type=int, default=None, help="override (smoke checks)")
    args = parser.parse_args(argv)
    setting = dict(SETTINGS[args.setting])
    if args.max_epochs is not None:
        setting["overrides"] = [*setting["overrides"], f"trainer.max_epochs={args.max_epochs}"]
    started = time.time()
    data_dir = args.prepared
    if data_dir is None:
        if not args.data.is_dir():
            sys.exit(f"error: real data not found at {args.data} (set PROSTATE_SEG_DATA)")
        data_dir = args.workdir / f"promise12_{setting['image_size']}"
        if not (data_dir / "manifest.csv").exists():
            prepare(args.data, data_dir, PrepareSettings(image_size=setting["image_size"]),
                    workers=len(os.sched_getaffinity(0)))
    names = [n for group in args.runs.split(",") for n in GROUPS[group.strip()]]
    workdir = args.workdir / f"{args.setting}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    command = "python benchmarks/real_data_accuracy.py " + " ".join(argv or sys.argv[1:])
    rows = []
    for name in names:  # the table is rewritten after every run: a cut-short run keeps it
        rows.append(run_one(name, RUNS[name], data_dir, workdir, setting))
        text = markdown(args.setting, rows, command, time.time() - started, data_dir)
        write_section(args.results, args.setting, text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
