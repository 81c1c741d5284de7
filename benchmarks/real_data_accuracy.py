"""Accuracy on real scans: PROMISE12 T2 volumes (../shared/data/prostate_t2), by fold.

    python benchmarks/real_data_accuracy.py --setting cpu --runs recipe     # the bar: fold 0
    python benchmarks/real_data_accuracy.py --runs recipe --seeds 0,1,2,3   # four replicates
    python benchmarks/real_data_accuracy.py --runs norm --folds 0,1   # issue 24's last table
    python benchmarks/real_data_accuracy.py --setting gpu --folds 0,1,2,3,4 --jobs 5

Prepares the scans (location: $PROSTATE_SEG_DATA) at the setting's size under --workdir,
trains each run on each fold of the stored 5-fold patient split (split_seed 0; a few training
patients choose the epoch and checkpoint), evaluates it per volume on the fold's held-out
patients at their original size, and writes the table into docs/RESULTS.md (or --results)
with the command, machine, date, time taken and software versions. The study itself, every
loss with paired statistics, is docs/STUDY.md's.

Runs (RUNS): the recipe (Dice loss, Adam 1e-3 with cosine decay, 2.5D input, instance norm,
scale and intensity augmentation, windowed intensities, the last epoch's weights; on the CPU in
bf16 where the CPU has it, as experiment=cpu); ``generalisation`` and ``second-round``: issue
24's two rounds, each change alone and together; ``norm``: the recipe and the recipe with batch
norm; ``ablations``: the recipe with one of its choices undone; ``fp32``: the recipe in fp32;
``160px``: the recipe at 160 px; ``bce``: the recipe with BCE + Dice, nnU-Net's loss;
``budget``: the recipe with 16 epochs, without its cosine schedule, or with 8 patients choosing
the checkpoint (``epochs``: the 16 epochs alone; ``longer``: 32); ``averaged``: 4 patients
choosing among exponential moving averages of the weights (``callbacks=averaged``); ``study``:
the original study's (Dice loss, Adam 1e-4, constant lr, single slices, study augmentation,
batch norm). Each run is evaluated with and without the largest connected component, flip
test-time augmentation, with the last epoch's weights, and with the last epoch's weights before
averaging (the same as the last epoch's for a run that does not average). ``--seeds`` trains
each run once per seed and summarises the replicates. ``--jobs N`` trains N runs at a time, as
the study's sweep shares its GPU: the GPU setting's five folds fit one GPU together.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra_plugins.gpu_pool_launcher.gpu_pool_launcher import visible_gpus  # noqa: E402
from prostate_seg.config import (available_cpus, compose_config, cpu_precision,  # noqa: E402
                                 job_environment)
from prostate_seg.inference.evaluate import evaluate_checkpoint  # noqa: E402
from prostate_seg.data.prepare import PrepareSettings, prepare  # noqa: E402
from prostate_seg.data.split import SPLIT_FILE  # noqa: E402
from prostate_seg.files import replacing  # noqa: E402
from prostate_seg.runs import run_late_gain  # noqa: E402
from prostate_seg.study.statistics import LATE_GAIN  # noqa: E402
from prostate_seg.training.fit import train  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "prostate_t2"

SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {
        "image_size": 128,
        "budget": "00:00:18:00",  # training stops here at the latest (20 min with the rest)
        # experiment=cpu's precision: bf16 where the CPU has it, else fp32
        "overrides": ["model=unet_small", "trainer=cpu", "data.batch_size=16",
                      "trainer.max_epochs=24", f"trainer.precision={cpu_precision()}"],
    },
    "gpu": {
        "image_size": 256,
        "budget": "00:00:10:00",
        # benchmarks/study.sh's (docs/STUDY.md says why): a U-Net of half the width, compiled,
        # the decoded slices in memory, 40 epochs; five folds fit one GPU together (--jobs 5)
        "overrides": ["model=unet", "model.net.features=[32,64,128,256]", "trainer=gpu",
                      "model.compile=true", "data.cache=true", "data.batch_size=16",
                      "trainer.max_epochs=40"],
    },
}
# The recipe, what experiment=cpu trains: Dice loss, Adam 1e-3 with cosine decay, 2.5D input,
# instance norm, scale and intensity augmentation (conf/augment), windowed intensities, the last
# epoch's weights (CHOSEN: the checkpoint the selection patients choose instead).
BASE = ["loss=dice", "optimizer.lr=1e-3", "scheduler=cosine", "data.context_slices=1",
        "model.net.norm=instance", "callbacks=final"]
CHOSEN = BASE[:-1]
RECIPE = "recipe: instance norm, Dice loss, scale + intensity augmentation, last epoch"
# What generalises to unseen centres (issue 24). First round: each change alone on the recipe
# as it was (BEFORE) and together (FIRST). A run is (overrides, prepare's intensity).
OLD = ["loss=bce_tversky", *BASE[1:-1], "model.net.norm=batch"]
NO_SCALE, NO_INTENSITY = ["augment.scale_p=0"], ["augment.intensity_p=0", "augment.blur_p=0"]
BEFORE = [*OLD, *NO_SCALE, *NO_INTENSITY]
FIRST = "first round: scale + intensity augmentation, landmark intensities"
# Second round, from FIRST to the recipe a change at a time (batch norm's frozen statistics
# were what under-segmented the unseen centre).
WITH_NORM = [*OLD[:-1], "model.net.norm=instance"]
SIZE = "data.image_size="  # a run's own size wins over the setting's
RUNS: dict[str, tuple[list[str], str]] = {
    RECIPE: (BASE, "window"),
    "before: study augmentation, windowed intensities": (BEFORE, "window"),
    "before + scale augmentation": ([*OLD, *NO_INTENSITY], "window"),
    "before + intensity augmentation": ([*OLD, *NO_SCALE], "window"),
    "before + landmark intensities": (BEFORE, "landmarks"),
    "before + scale and intensity augmentation": (OLD, "window"),
    FIRST: (OLD, "landmarks"),
    "first round + instance norm": (WITH_NORM, "landmarks"),
    "first round + instance norm, windowed intensities": (WITH_NORM, "window"),
    "recipe with batch norm": ([*BASE[:-1], "model.net.norm=batch"], "window"),
    "recipe without cosine schedule": ([o for o in BASE if o != "scheduler=cosine"], "window"),
    "recipe, 16 epochs": ([*BASE, "trainer.max_epochs=16"], "window"),
    "recipe, 32 epochs": ([*BASE, "trainer.max_epochs=32"], "window"),
    "recipe, 8 selection patients choosing": ([*CHOSEN, "data.select_fraction=0.3"], "window"),
    "recipe, averaged weights (EMA), chosen": ([*CHOSEN, "callbacks=averaged"], "window"),
    "recipe with the checkpoint 4 selection patients choose": (CHOSEN, "window"),
    "recipe without 2.5D (single slices)": ([*BASE[:3], "data.context_slices=0", *BASE[4:]],
                                            "window"),
    "recipe in fp32": ([*BASE, "trainer.precision=32-true"], "window"),
    "recipe at 160 px": ([*BASE, f"{SIZE}160"], "window"),
    "recipe, BCE + Dice loss": (["loss=bce_tversky", *BASE[1:]], "window"),
    "study recipe (Dice loss, Adam 1e-4)": (["loss=dice", "optimizer.lr=1e-4", *NO_SCALE,
                                             *NO_INTENSITY, "model.net.norm=batch"], "window"),
}
GROUPS = {"recipe": [RECIPE],
          # the order runs are trained in (the table keeps RUNS's): the most telling first
          "generalisation": [k for k in RUNS if k.startswith("before")][::-1] + [FIRST],
          "second-round": [FIRST, "first round + instance norm",
                           "first round + instance norm, windowed intensities", RECIPE],
          "norm": [RECIPE, "recipe with batch norm"],
          "ablations": [k for k in RUNS if k.startswith("recipe with")],
          # issue 24's other candidates: the epoch budget, the schedule, who chooses the epoch
          "budget": ["recipe, 16 epochs", "recipe without cosine schedule",
                     "recipe, 8 selection patients choosing"],
          "averaged": ["recipe, averaged weights (EMA), chosen"],
          # the recipe's earlier length, which four seeds on fold 0 found short
          "epochs": ["recipe, 16 epochs"],
          # the runs still rise at 24 epochs; 32 gained +0.014 over 12 fold-0 pairs, not enough
          # to adopt by the rule set beforehand (docs/RESULTS.md, eleventh to thirteenth rounds)
          "longer": ["recipe, 32 epochs"],
          # the recipe before bf16, and what the time bf16 saves buys
          "fp32": ["recipe in fp32"],
          "160px": ["recipe at 160 px"],
          # nnU-Net's loss: does BCE beside Dice steady the runs on a patient unlike the rest?
          "bce": ["recipe, BCE + Dice loss"],
          # the recipe's one input choice older than issue 24: two neighbours or none
          "2d": ["recipe without 2.5D (single slices)"],
          "study": ["study recipe (Dice loss, Adam 1e-4)"]}
SPLIT_OVERRIDES = ("data.select_fraction=", "data.split_seed=", "data.folds=")
# Runs trained before each transform drew from its own stream (their flips, blur and noise drew
# alike) are not reused as today's.
AUGMENT_STREAMS = "own"
TAG = "benchmark_run.json"  # in a run folder: which run and fold it is, and its training time
LAST, RAW = "last epoch +LCC+TTA", "last epoch not averaged +LCC+TTA"
EVALUATIONS = (("plain", False, False), ("+LCC", True, False), ("+LCC+TTA", True, True),
               (LAST, True, True), (RAW, True, True))


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {len(os.sched_getaffinity(0))} CPU cores"
    return f"{platform.processor() or platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores"


def run_overrides(name: str, fold: int, setting: dict[str, Any]) -> list[str]:
    """The train overrides of run ``name`` on ``fold`` under ``setting`` (all but data.dir)."""
    return [f"{SIZE}{image_size(name, setting)}", *setting["overrides"],
            *[o for o in RUNS[name][0] if not o.startswith(SIZE)], f"data.fold={fold}",
            f"++trainer.max_time={setting['budget']}",
            "callbacks.early_stopping=null", "callbacks.progress_bar.refresh_rate=0"]


def run_one(name: str, fold: int, seed: int | None, data_dir: Path, folder: Path,
            setting: dict[str, Any], reuse: list[Path],
            only_reused: bool = False) -> dict[str, Any] | None:
    """Train in ``folder`` (or take a finished run of the same name, fold and overrides from
    ``reuse``) and evaluate its checkpoints on the fold's held-out patients; None if not reused
    and ``only_reused``. ``seed``: the run's (None: the config's), among ``setting``'s
    overrides."""
    overrides = run_overrides(name, fold, setting)
    tag = {"run": name, "fold": fold, "overrides": overrides, "intensity": RUNS[name][1],
           "augment_streams": AUGMENT_STREAMS}
    recorded = [(f.parent, json.loads(f.read_text())) for f in reuse]
    done = [(run_dir, r) for run_dir, r in recorded if {k: r.get(k) for k in tag} == tag
            and (run_dir / "results.json").is_file()]
    if done:
        folder, record = done[0]
        results = json.loads((folder / "results.json").read_text())
    elif only_reused:
        print(f"{name}, fold {fold}: not run (no finished run to reuse)", flush=True)
        return None
    else:
        quoted = str(data_dir).replace("'", "\\'")  # a path may hold Hydra's = , [ ] ...
        cfg = compose_config("train", [f"data.dir='{quoted}'", *overrides], folder)
        started = time.time()
        results = train(cfg)
        record = {**tag, "seconds": time.time() - started}
        (folder / TAG).write_text(json.dumps(record))
    row: dict[str, Any] = {"run": name, "fold": fold, "seed": seed,
                           "epochs": results["epochs_trained"],
                           "train_min": record["seconds"] / 60,
                           "select_dice_training": results["select/dice"],
                           # read off the curve: a reused run is judged by the current rule
                           "late_gain": run_late_gain(folder), "reused": bool(done)}
    last = Path(results["best_checkpoint"]).with_name("last.ckpt")
    # the kept checkpoint holds the last epoch's weights when it was the last epoch
    kept = (last if results["best_epoch"] == results["epochs_trained"] - 1
            else results["best_checkpoint"])
    checkpoints = {LAST: last, RAW: not_averaged(last)}
    scored: dict[tuple[Any, bool, bool], list[dict[str, Any]]] = {}
    for label, largest_component, tta in EVALUATIONS:
        key = (checkpoints.get(label, kept), largest_component, tta)
        if key not in scored:
            scored[key] = evaluate_checkpoint(key[0], largest_component=largest_component, tta=tta)
        row[label] = scored[key]
    print(f"{name}, fold {fold}{'' if seed is None else f', seed {seed}'}: "
          + ", ".join(f"{label} {mean(row[label], 'dice'):.4f}" for label, *_ in EVALUATIONS)
          + f" ({row['epochs']} epochs, {row['train_min']:.1f} min)", flush=True)
    return row


def in_processes(function: Callable[..., Any], calls: list[tuple[Any, ...]], jobs: int,
                 labels: list[str]) -> Iterator[tuple[int, Any]]:
    """(index, result) of each ``function(*call)`` as it finishes. ``jobs`` > 1: that many at a
    time, in order, each in a process of its own with a GPU in turn and its share of the CPUs
    (config.job_environment, as the gpu_pool launcher places a sweep's jobs). A call that fails
    starts no other: the running ones finish and are yielded, then its error is raised, named
    by its label. Ctrl-C or SIGTERM ends the processes."""
    jobs = min(jobs, len(calls))
    if jobs <= 1:
        for index, call in enumerate(calls):
            yield index, function(*call)
        return
    context = multiprocessing.get_context("spawn")  # CUDA is never started before the pinning
    slots = context.Queue()
    gpus = visible_gpus()
    for slot in range(jobs):
        slots.put(gpus[slot % len(gpus)] if gpus else None)
    shared = job_environment(None, max(1, available_cpus() // jobs))  # read as torch starts
    saved = {key: os.environ.get(key) for key in shared}
    os.environ.update(shared)
    previous = signal.signal(signal.SIGTERM, _terminated)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_pin, initargs=(slots,))
    queued, running, failure = list(enumerate(calls)), {}, None
    try:
        while queued or running:
            while queued and failure is None and len(running) < jobs:  # none waits in the pool
                index, call = queued.pop(0)
                running[pool.submit(function, *call)] = index
            if not running:  # a run failed and the others have ended
                break
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                index = running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - raised once the running ones end
                    exc.add_note(f"in {labels[index]}")
                    failure = failure or exc
                    continue
                yield index, result
    except BaseException:
        for process in multiprocessing.active_children():
            process.terminate()  # a run saves nothing the table needs: no grace period
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if failure is not None:
        raise failure


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _pin(slots: Any) -> None:
    """A worker process's GPU, from the parent's queue of slots (before CUDA starts)."""
    os.environ.update(job_environment(slots.get(), int(os.environ["PROSTATE_SEG_CPUS"])))


def not_averaged(last: Path) -> Path:
    """The last epoch's raw weights: ``last`` itself, or for a run that averages its weights
    (Lightning's WeightAveraging keeps the raw ones in ``current_model_state``) a copy holding
    them, written once beside it."""
    raw = last.with_name("last-not-averaged.ckpt")
    if raw.exists():
        return raw
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    if "current_model_state" not in checkpoint:
        return last
    checkpoint["state_dict"] = checkpoint.pop("current_model_state")
    partial = raw.with_name(raw.name + ".partial")
    torch.save(checkpoint, partial)
    partial.rename(raw)
    return raw


def mean(patients: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([p[key] for p in patients]))


def seed_cell(seed: int | None) -> str:
    return "config" if seed is None else str(seed)


def dice_cell(patients: list[dict[str, Any]]) -> str:
    dice = np.array([p["dice"] for p in patients])
    return f"{dice.mean():.4f} ± {dice.std(ddof=1):.4f}"


def markdown(setting_name: str, rows: list[dict[str, Any]], command: str, seconds: float,
             jobs: int = 1) -> str:
    versions = (f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, "
                f"Python {platform.python_version()}")
    labels = [label for label, *_ in EVALUATIONS]
    lines = [
        f"### {setting_name.upper()} setting: {', '.join(dict.fromkeys(r['run'] for r in rows))}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}; date: {datetime.date.today().isoformat()}; {versions}",
        "- data: the scans prepared at the setting's size or a run's own (`window`: linear "
        "between each scan's 0.5 and 99.5 percentiles, the study's; `landmarks`: "
        "`prepare intensity=landmarks`)",
        f"- this command's time (prepare, runs, evaluation): {seconds / 60:.1f} min"
        + ("; runs marked * were trained by an earlier command (--reuse) in the time shown"
           if any(row["reused"] for row in rows) else "")
        + (f"; {jobs} runs trained at a time, so a run's training minutes are shared"
           if jobs > 1 else ""),
        "",
        "Per-volume Dice on each fold's held-out patients at original size, mean ± SD over "
        "patients (LCC: largest 3D connected component kept; TTA: left-right flip averaged; "
        f"{LAST}: the last epoch's weights, for a run that keeps the checkpoint its selection "
        f"patients chose; {RAW}: before averaging, for a run that averages); precision and "
        "recall: means over patients, plain (the network's own output: a run's per_patient.csv) "
        "and +LCC+TTA (what `predict` and `evaluate` give by default); "
        "late gain: how much the selection Dice rose over the last quarter of the epochs, at "
        "the pace of a line fitted through them (the report flags a loss whose runs average "
        f"above {LATE_GAIN}, and above 0 by a t-test).",
        "",
        "| run | fold | seed | " + " | ".join(f"Dice {label}" for label in labels)
        + " | precision / recall plain | precision / recall +LCC+TTA"
        " | select/dice (training, network size) | late gain | epochs | training min |",
        "|---|---|---|" + "---|" * (len(labels) + 6),
    ]
    for row in sorted(rows, key=lambda r: (list(RUNS).index(r["run"]), r["fold"],
                                           r["seed"] or 0)):
        plain, chosen = row["plain"], row["+LCC+TTA"]
        gain = "–" if row["late_gain"] is None else f"{row['late_gain']:+.4f}"
        lines.append(f"| {row['run']}{' *' if row['reused'] else ''} | {row['fold']} | "
                     f"{seed_cell(row['seed'])} | "
                     + " | ".join(dice_cell(row[label]) for label in labels)
                     + f" | {mean(plain, 'precision'):.3f} / {mean(plain, 'recall'):.3f}"
                     f" | {mean(chosen, 'precision'):.3f} / {mean(chosen, 'recall'):.3f} | "
                     f"{row['select_dice_training']:.4f} | {gain} | {row['epochs']} | "
                     f"{row['train_min']:.1f} |")
    runs = sorted({row["run"] for row in rows}, key=list(RUNS).index)
    folds = sorted({row["fold"] for row in rows})
    lines += over_seeds(rows, runs, folds)
    if len(folds) > 1:
        lines += ["", f"Over folds {', '.join(map(str, folds))} (each patient once a seed, "
                  "+LCC+TTA):", "", "| run | seed | folds | patients | Dice | precision | recall |",
                  "|---|---|---|---|---|---|---|"]
        pooled: dict[str, list[float]] = {}  # run: each seed's Dice over the folds' patients
        for run, seed in dict.fromkeys((row["run"], row["seed"]) for row in sorted(
                rows, key=lambda r: (list(RUNS).index(r["run"]), r["seed"] or 0))):
            mine = [row for row in rows if row["run"] == run and row["seed"] == seed]
            patients = [p for row in mine for p in row["+LCC+TTA"]]
            pooled.setdefault(run, []).append(mean(patients, "dice"))
            lines.append(f"| {run} | {seed_cell(seed)} | {len(mine)} | "
                         f"{len(patients)} | {dice_cell(patients)} | "
                         f"{mean(patients, 'precision'):.3f} | {mean(patients, 'recall'):.3f} |")
        for run, seeds in pooled.items():  # what a bar over folds is judged on: the seeds' spread
            if len(seeds) > 1:
                dice = np.array(seeds)
                lines.append(f"| {run} | mean of {len(seeds)} seeds | | | {dice.mean():.4f} ± "
                             f"{dice.std(ddof=1):.4f} (SD over seeds) | | |")
    first = rows[0]
    lines += ["", f"Per patient ({first['run']}, fold {first['fold']}, plain):", "",
              "| patient | Dice | precision | recall | HD95 |", "|---|---|---|---|---|"]
    for p in first["plain"]:
        lines.append(f"| {p['patient']} | {p['dice']:.4f} | {p['precision']:.4f} | "
                     f"{p['recall']:.4f} | {p['hd95']:.1f} {p['hd95_unit']} |")
    return "\n".join(lines) + "\n"


def over_seeds(rows: list[dict[str, Any]], runs: list[str], folds: list[int]) -> list[str]:
    """Each run and fold trained under several seeds, summarised with the trained run as the
    replicate: every patient of a run is scored by one model, so a lucky run lifts them all
    together and the spread that matters is the one between runs."""
    groups = [(run, fold, [r for r in rows if r["run"] == run and r["fold"] == fold])
              for run in runs for fold in folds]
    groups = [(run, fold, mine) for run, fold, mine in groups if len(mine) > 1]
    if not groups:
        return []
    lines = ["", "Over seeds (each run's mean over its patients, then mean ± SD over the runs, "
             "and the 95 % t interval of that mean: training randomness, the runs as "
             "replicates):", "",
             "| run | fold | runs | Dice plain | 95 % CI | min - max | Dice +LCC+TTA | 95 % CI "
             "| precision / recall plain | precision / recall +LCC+TTA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run, fold, mine in groups:
        cells = []
        for label in ("plain", "+LCC+TTA"):
            dice = np.array([mean(r[label], "dice") for r in mine])
            half = stats.t.ppf(0.975, len(dice) - 1) * dice.std(ddof=1) / np.sqrt(len(dice))
            cells.append(f"{dice.mean():.4f} ± {dice.std(ddof=1):.4f} | "
                         f"{dice.mean() - half:.3f} - {dice.mean() + half:.3f}")
            if label == "plain":
                cells.append(f"{dice.min():.3f} - {dice.max():.3f}")
        for label in ("plain", "+LCC+TTA"):
            cells.append(" / ".join(f"{np.mean([mean(r[label], k) for r in mine]):.3f}"
                                    for k in ("precision", "recall")))
        lines.append(f"| {run} | {fold} | {len(mine)} | {' | '.join(cells)} |")
    return lines


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the section between the markers of ``key`` (setting, runs and
    folds: the headline run and the ablation table keep their own) in ``path``."""
    start, end = f"<!-- real_data:{key}:start -->", f"<!-- real_data:{key}:end -->"
    block = f"{start}\n{text}{end}\n"
    content = path.read_text() if path.exists() else "# Results\n\n"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        content = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        content = content.rstrip("\n") + "\n\n" + block
    with replacing(path) as partial:  # whole, if the benchmark is stopped while it writes
        partial.write_text(content)


def image_size(name: str, setting: dict[str, Any]) -> int:
    """The slices' size a run trains at: its own ``data.image_size=``, else the setting's."""
    own = [int(o[len(SIZE):]) for o in RUNS[name][0] if o.startswith(SIZE)]
    return own[-1] if own else setting["image_size"]  # the last override wins, as in Hydra


def prepared(args: argparse.Namespace, size: int, intensity: str) -> Path:
    """The scans prepared at ``size`` with ``intensity`` (made once, then reused)."""
    suffix = "" if intensity == "window" else f"_{intensity}"
    data_dir = args.workdir / f"promise12_{size}{suffix}"
    if not (data_dir / "manifest.csv").exists():
        if not args.data.is_dir():
            sys.exit(f"error: real data not found at {args.data} (set PROSTATE_SEG_DATA)")
        prepare(args.data, data_dir, PrepareSettings(image_size=size, intensity=intensity),
                workers=len(os.sched_getaffinity(0)))
    return data_dir


def own_split(data_dir: Path, overrides: list[str]) -> Path:
    """The scans of a run that splits the patients differently, copied once: the split is
    stored with them and a second one would be refused."""
    own = [o.split(".", 1)[1].replace("=", "-") for o in overrides
           if o.startswith(SPLIT_OVERRIDES)]
    if not own:
        return data_dir
    copy = data_dir.with_name("_".join([data_dir.name, *own]))
    if not copy.exists():
        partial = copy.with_name(copy.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(data_dir, partial, ignore=shutil.ignore_patterns(SPLIT_FILE))
        partial.rename(copy)
    return copy


def whole_numbers(text: str) -> list[int]:
    """--folds and --seeds: distinct whole numbers, comma-separated (argparse names the option)."""
    try:
        numbers = [int(word) for word in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers") from None
    if len(set(numbers)) < len(numbers) or min(numbers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} repeats a number or has a negative one")
    return numbers


def positive(text: str) -> int:
    """--jobs: a whole number >= 1 (argparse names the option)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("PROSTATE_SEG_DATA", DEFAULT_DATA)))
    parser.add_argument("--runs", default="recipe", help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--folds", default="0", type=whole_numbers,
                        help="comma-separated folds of the 5-fold split")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench",
                        help="prepared scans and run folders")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="earlier benchmark folders: their finished runs of the same name, "
                        "fold and settings are evaluated, not trained again")
    parser.add_argument("--only-reused", action="store_true",
                        help="tabulate the reused runs only, train none")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md")
    parser.add_argument("--max-epochs", type=int, default=None, help="override (smoke checks)")
    parser.add_argument("--max-time", default=None,
                        help="training's time cap, DD:HH:MM:SS (default: the setting's)")
    parser.add_argument("--seeds", default=None, type=whole_numbers,
                        help="comma-separated seeds, each run trained once per seed: replicates "
                        "of training, summarised over runs (default: the config's seed)")
    parser.add_argument("--jobs", default=1, type=positive,
                        help="runs trained at a time, each in its own process with its share "
                        "of the CPUs and GPUs (default 1, in this process)")
    args = parser.parse_args(argv)
    setting = dict(SETTINGS[args.setting])
    epochs = [] if args.max_epochs is None else [f"trainer.max_epochs={args.max_epochs}"]
    setting["budget"] = args.max_time or setting["budget"]
    started = time.time()
    unknown = sorted(set(g.strip() for g in args.runs.split(",")) - set(GROUPS))
    if unknown:
        parser.error(f"--runs {args.runs}: unknown {', '.join(unknown)} "
                     f"(one of {', '.join(GROUPS)})")
    names = list(dict.fromkeys(n for group in args.runs.split(",") for n in GROUPS[group.strip()]))
    workdir = args.workdir / f"{args.setting}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    reuse = [f for folder in args.reuse for f in folder.rglob(TAG)]
    command = "python benchmarks/real_data_accuracy.py " + " ".join(argv or sys.argv[1:])
    finished: dict[int, dict[str, Any]] = {}
    folds, seeds = args.folds, args.seeds or [None]
    calls, labels = [], []
    for index, (name, fold, seed) in enumerate(
            [(n, f, s) for n in names for f in folds for s in seeds]):
        data_dir = own_split(prepared(args, image_size(name, setting), RUNS[name][1]),
                             RUNS[name][0])
        own = [*setting["overrides"], *([] if seed is None else [f"seed={seed}"]), *epochs]
        calls.append((name, fold, seed, data_dir, workdir / str(index),
                      {**setting, "overrides": own}, reuse, args.only_reused))
        labels.append(f"{name}, fold {fold}" + ("" if seed is None else f", seed {seed}"))
    for index, row in in_processes(run_one, calls, args.jobs, labels):
        if row is None:
            continue
        finished[index] = row
        rows = [finished[i] for i in sorted(finished)]  # the command's order, not the ends'
        # the table is rewritten after every run: a cut-short benchmark keeps what it measured
        text = markdown(args.setting, rows, command, time.time() - started,
                        min(args.jobs, len(calls)))
        key = f"{args.setting}:{args.runs}:folds {','.join(map(str, folds))}"
        if args.seeds is not None:  # one seed: the key earlier sections were written under
            key += f":seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
        write_section(args.results, key, text)
    if finished:
        print(text)
    return [finished[i] for i in sorted(finished)]  # the command's order


if __name__ == "__main__":
    main()
