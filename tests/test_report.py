"""The report on hand-made run folders (written as training writes them, per the run-folder
contract) and on long tables from other tools, good and bad."""

import csv
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from omegaconf import OmegaConf
from scipy import stats

from prostate_seg.study import figures, report
from prostate_seg.errors import DataError
from prostate_seg.study.report import (
    LONG_TABLE,
    collect_runs,
    main,
    read_long_table,
    report_table,
)
from prostate_seg.runs import RunLock, read_history
from prostate_seg.study.statistics import analyse
from prostate_seg.study.sweep_report import SweepReport

PATIENTS = [f"case{i:02d}" for i in range(12)]
TOTAL = 48 * 48 * 10


def patient_dice(loss_index, seed, fold_patients, effect=0.0):
    """Deterministic Dice: patients spread over 0.70-0.92, a +-0.004 zigzag that flips
    between neighbouring losses, 0.001 per seed, and a small irregular part so that no two
    differences tie."""
    return {p: round(0.70 + 0.02 * (i := PATIENTS.index(p)) + effect
                     + 0.004 * (-1) ** (i + loss_index) + 0.001 * seed
                     + 0.0001 * math.sqrt(7 * i + 3 * loss_index + 1), 6)
            for p in fold_patients}


def write_run(folder: Path, loss, fold, seed, dice, *, status="completed", group=None,
              config=None, best_epoch=4, epochs_trained=8, stopped_early=True,
              late_gain=-0.01, curve_gain=None, pred_fraction=0.02, split="val", preview=True):
    """A run folder as the training writes it: status.json, results.json, per_patient.csv,
    metrics.csv (a selection curve rising by ``curve_gain``, by default ``late_gain``, over its
    last epochs) and val_preview.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    group = group or f"group-{loss}"
    identity = {"hash": f"{group}-{fold}-{seed}", "group": group,
                "config": {"loss.name": loss, "seed": seed, "data.fold": fold, **(config or {})}}
    (folder / "status.json").write_text(json.dumps({
        "status": status, "identity": identity,
        "error": "RuntimeError: CUDA out of memory" if status == "failed" else None}))
    if status != "completed":
        return
    (folder / "results.json").write_text(json.dumps({
        "loss": loss, "seed": seed, "fold": fold, "folds": 3, "group": group,
        "identity": identity["hash"], "best_epoch": best_epoch,
        "epochs_trained": epochs_trained, "max_epochs": 8, "stopped_early": stopped_early,
        "late_gain": late_gain,
        "alpha": float(loss[len("tversky_a"):]) if loss.startswith("tversky_a") else None,
        "val/dice_original": float(np.mean(list(dice.values()))) if dice else None,
        "patients": {split: list(dice)}}))
    with open(folder / "per_patient.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient", "split", "dice", "precision", "recall", "hd95",
                         "hd95_failed", "hd95_unit", "voxels_pred", "voxels_true",
                         "voxels_total", "slices"])
        for patient, value in dice.items():
            writer.writerow([patient, split, value, min(1.0, value + 0.05), max(0.0, value - 0.05),
                             round(20 * (1 - value), 3), 0, "mm", int(TOTAL * pred_fraction),
                             int(TOTAL * 0.02), TOTAL, 10])
    tail = max(epochs_trained // 4, min(epochs_trained, 3))  # late_gain's, so a line gives it
    rise = (late_gain if curve_gain is None else curve_gain) / tail
    write_history(folder / "metrics" / "version_0",
                  [(e, 5 * e + 5, 1 / (e + 1), 1.2 / (e + 1), 0.5 + rise * e)
                   for e in range(epochs_trained)])
    if preview:
        yy, xx = np.mgrid[:32, :32]
        mask = (((yy - 16) ** 2 + (xx - 16) ** 2) < 49).astype(np.uint8)[None].repeat(2, 0)
        prob = np.full(mask.shape, float(pred_fraction >= 0.5), np.float16)
        if 0 < pred_fraction < 0.5:
            prob = mask.astype(np.float16)
        np.savez_compressed(folder / "val_preview.npz", image=(mask * 0.5).astype(np.float16),
                            mask=mask, prob=prob, names=np.array(["case00_z3", "case03_z4"]))


def write_history(version: Path, epochs):
    """metrics.csv as Lightning's CSVLogger writes it: per epoch the learning rate (by step
    only), the selection metrics and the training loss, each a row of its own."""
    version.mkdir(parents=True)
    with open(version / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "lr-Adam", "select/dice", "select/loss", "step", "train/loss"])
        for epoch, step, train, select, dice in epochs:
            writer.writerows([["", 0.001, "", "", step - 5, ""],
                              [epoch, "", dice, select, step, ""], [epoch, "", "", "", step, train]])


def test_history_is_one_row_per_epoch_and_a_resumed_epoch_is_the_latest_start(tmp_path):
    """Started, interrupted in epoch 2 after its validation, resumed from epoch 1's last.ckpt:
    epoch 2 is the second start's, no epoch lost or twice."""
    write_history(tmp_path / "metrics" / "version_0",
                  [(0, 5, 0.9, 1.0, 0.5), (1, 10, 0.8, 0.9, 0.6), (2, 15, 0.7, 0.8, 0.7)])
    write_history(tmp_path / "metrics" / "version_1",
                  [(2, 15, 0.65, 0.75, 0.72), (3, 20, 0.6, 0.7, 0.8)])
    history = read_history(tmp_path)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[2] == {"epoch": 2, "select/dice": 0.72, "select/loss": 0.75, "step": 15,
                          "train/loss": 0.65}


def make_sweep(root: Path, effects=None, seeds=(0, 1), folds=3, **kwargs) -> Path:
    """bce and two Tversky losses x folds x seeds; every patient validated once per seed."""
    effects = effects or {"bce": 0.0, "tversky_a0.25": 0.0, "tversky_a0.5": 0.03}
    for k, (loss, effect) in enumerate(effects.items()):
        for seed in seeds:
            for fold in range(folds):
                mine = PATIENTS[fold::folds]
                write_run(root / f"{loss}-fold{fold}-seed{seed}", loss, fold, seed,
                          patient_dice(k, seed, mine, effect), **kwargs)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_report_pairs_patients_across_losses(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    assert main([str(sweep)]) == 0
    report = sweep / "report"
    long = read_csv(report / "per_patient.csv")
    assert len(long) == 3 * 2 * len(PATIENTS)  # losses x seeds x patients
    first = next(r for r in long if r["run"] == "tversky_a0.5-fold1-seed0" and
                 r["patient"] == "case01")
    assert first["loss"] == "tversky_a0.5" and first["fold"] == "1" and first["seed"] == "0"
    assert float(first["dice"]) == patient_dice(2, 0, ["case01"], 0.03)["case01"]
    assert first["best_epoch"] == "4" and first["stopped_early"] == "true"
    assert first["group"] == "group-tversky_a0.5" and first["voxels_total"] == str(TOTAL)

    # each patient's Dice is its mean over the two seeds; the loss's Dice the mean of those
    per_patient = {loss: {p: np.mean([patient_dice(k, s, [p], e)[p] for s in (0, 1)])
                          for p in PATIENTS}
                   for k, (loss, e) in enumerate({"bce": 0, "tversky_a0.25": 0,
                                                  "tversky_a0.5": 0.03}.items())}
    results = {r["loss"]: r for r in read_csv(report / "results.csv")}
    assert list(results) == ["bce", "tversky_a0.25", "tversky_a0.5"]
    assert float(results["bce"]["dice_mean"]) == pytest.approx(
        np.mean(list(per_patient["bce"].values())))
    assert results["bce"]["n_patients"] == "12" and results["bce"]["n_runs"] == "6"
    assert results["bce"]["folds"] == "3" and results["bce"]["seeds"] == "2"
    # a run's shift: within each fold the two seeds' runs differ by exactly 0.001
    assert float(results["bce"]["run_sd"]) == pytest.approx(0.001 / math.sqrt(2))

    comparisons = read_csv(report / "comparisons.csv")
    assert list(comparisons[0])[:11] == ["loss", "baseline", "n_patients", "n_run_pairs",
                                         "mean_diff", "ci_low", "ci_high", "df", "p_value",
                                         "p_holm", "significant"]
    by_loss = {c["loss"]: c for c in comparisons}
    d = np.array([per_patient["tversky_a0.5"][p] - per_patient["bce"][p] for p in PATIENTS])
    c = by_loss["tversky_a0.5"]
    assert c["baseline"] == "bce" and c["n_patients"] == "12" and c["n_run_pairs"] == "6"
    assert float(c["mean_diff"]) == pytest.approx(d.mean())
    # by hand: the difference is the same in both seeds (no run shift, no residual), so only
    # the patients vary: a t-test with the within-fold variance, 12 - 3 degrees of freedom
    fold = np.arange(12) % 3
    within = sum(((d[fold == k] - d[fold == k].mean()) ** 2).sum() for k in range(3)) / 9
    t = d.mean() / math.sqrt(within / 12)
    assert float(c["df"]) == pytest.approx(9)
    assert float(c["p_value"]) == pytest.approx(2 * stats.t.sf(abs(t), 9))
    assert float(c["p_holm"]) == pytest.approx(min(1, 2 * float(c["p_value"])))
    assert c["significant"] == "true" and by_loss["tversky_a0.25"]["significant"] == "false"

    md = (report / "results.md").read_text()
    assert md.startswith("Training randomness is measured by 2 seeds in each of 3 folds")
    assert ("**On 12 val patients (3 folds × 2 seeds), paired per-patient Dice differences "
            "with trained runs as the replicate, Holm over 2 comparisons") in md
    assert "tversky_a0.5 scores higher than bce: ΔDice +0.030" in md
    assert "docs/METHOD.md" in md
    assert "## Protocol: what chose what, on which patients" in md
    for name in ("forest", "paired", "scores", "contours", "loss_curves"):
        assert f"![{name}]({name}.png)" in md
        assert (report / f"{name}.png").stat().st_size > 5_000


def test_sweep_mode_is_table_mode_on_its_long_table(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    assert main([str(sweep), "--all-pairs"]) == 0
    out = tmp_path / "again"
    assert main(["--table", str(sweep / "report" / "per_patient.csv"), "--out", str(out),
                 "--all-pairs"]) == 0
    for name in ("results.csv", "comparisons.csv"):
        assert (out / name).read_text() == (sweep / "report" / name).read_text()
    assert len(read_csv(out / "comparisons.csv")) == 3  # all pairs of three losses
    # only what the table supports: no run folders, so no contours or loss curves
    assert sorted(p.name for p in out.glob("*.png")) == ["alpha_search.png", "forest.png",
                                                          "paired.png", "scores.png"]


def test_groups_that_share_a_loss_name_are_told_apart(tmp_path):
    sweep = tmp_path / "sweep"
    for lr, group, shift in (("0.0001", "g-slow", 0.0), ("0.001", "g-fast", 0.02)):
        for seed in (0, 1):
            write_run(sweep / f"bce-lr{lr}-seed{seed}", "bce", 0, seed,
                      patient_dice(0, seed, PATIENTS, shift), group=group,
                      config={"optimizer.lr": float(lr), "model.name": "unet"})
    assert main([str(sweep)]) == 0
    labels = {r["loss"] for r in read_csv(sweep / "report" / "per_patient.csv")}
    assert labels == {"bce (optimizer.lr=0.0001)", "bce (optimizer.lr=0.001)"}
    results = [r["loss"] for r in read_csv(sweep / "report" / "results.csv")]
    assert results == ["bce (optimizer.lr=0.0001)", "bce (optimizer.lr=0.001)"]


def test_one_broken_folder_is_listed_and_the_rest_reported(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    (sweep / "bce-fold0-seed0" / "results.json").write_text('{"loss": "bce", "seed"')
    (sweep / "bce-fold1-seed0" / "status.json").write_text("not json at all")
    preview = sweep / "bce-fold2-seed0" / "val_preview.npz"
    preview.write_bytes(preview.read_bytes()[:40])  # truncated
    bad = sweep / "tversky_a0.25-fold0-seed1" / "per_patient.csv"
    bad.write_text(bad.read_text().replace(f"case00,val,{patient_dice(1, 1, ['case00'])['case00']},", "case00,val,n/a,"))
    hydra = sweep / "tversky_a0.5-fold0-seed1" / ".hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text("loss: [unclosed\n")  # a broken config is not read
    results = sweep / "tversky_a0.5-fold1-seed1" / "results.json"
    results.write_text(results.read_text().replace('"best_epoch": 4', '"best_epoch": "soon"'))
    twice = sweep / "tversky_a0.5-fold2-seed1" / "per_patient.csv"
    twice.write_text(twice.read_text() + twice.read_text().splitlines()[1] + "\n")
    cut = sweep / "tversky_a0.25-fold1-seed0" / "per_patient.csv"
    cut.write_text("".join(cut.read_text().splitlines(keepends=True)[:-1]))  # last patient gone
    moved = sweep / "tversky_a0.25-fold2-seed0" / "per_patient.csv"
    moved.write_text(moved.read_text().replace("case02,", "case01,", 1))  # fold 1's patient
    extra = sweep / "tversky_a0.25-fold1-seed1" / "per_patient.csv"
    extra.write_text(extra.read_text() + extra.read_text().splitlines()[1].replace("case01",
                                                                                 "case00") + "\n")
    write_run(sweep / "tversky_a0.75-fold0-seed0", "tversky_a0.75", 0, 0, {}, status="failed")
    write_run(sweep / "tversky_a0.75-fold1-seed0", "tversky_a0.75", 1, 0, {}, status="running")
    write_run(sweep / "tversky_a0.75-fold1-seed1", "tversky_a0.75", 1, 1, {}, status="running")
    (sweep / "tversky_a0.75-fold2-seed0" / ".hydra").mkdir(parents=True)  # never got going

    live = RunLock(sweep / "tversky_a0.75-fold1-seed1")
    live.acquire()  # a job still at work there; the other "running" one was killed
    try:
        result = run_cli("-m", "prostate_seg", "report", str(sweep), cwd=tmp_path)
    finally:
        live.release()
    assert result.returncode == 0, result.stderr
    md = (sweep / "report" / "results.md").read_text()
    problems = md.split("## Runs not in the statistics, and other problems")[1]
    assert "- `bce-fold0-seed0`: broken — results.json unreadable (" in problems
    assert "- `bce-fold1-seed0`: broken — status.json unreadable (" in problems
    assert ("- `tversky_a0.25-fold0-seed1`: broken — per_patient.csv line 2: dice='n/a' is "
            "not a number") in problems
    assert ("- `tversky_a0.5-fold1-seed1`: broken — results.json: best_epoch='soon' is not a "
            "number") in problems
    assert ("- `tversky_a0.5-fold2-seed1`: broken — per_patient.csv line 6: duplicate of line 2 "
            "(patient=case02, split=val)") in problems
    assert ("- `tversky_a0.25-fold1-seed0`: broken — per_patient.csv: 1 val patient(s) missing "
            "(e.g. case10), against the list in results.json") in problems
    assert ("- `tversky_a0.25-fold2-seed0`: broken — per_patient.csv: 1 val patient(s) missing "
            "(e.g. case02), against the list in results.json") in problems
    assert ("- `tversky_a0.25-fold1-seed1`: broken — per_patient.csv: 1 val patient(s) not of "
            "this fold (e.g. case00), against the list in results.json") in problems
    assert "- `tversky_a0.75-fold0-seed0`: failed — RuntimeError: CUDA out of memory" in problems
    assert ("- `tversky_a0.75-fold1-seed0`: failed — status.json says running but no process "
            "works in the folder: killed") in problems
    assert "- `tversky_a0.75-fold1-seed1`: running — still running (pid " in problems
    assert "- `tversky_a0.75-fold2-seed0`: unfinished — no status.json" in problems
    assert ("`bce-fold2-seed0`: val_preview.npz unreadable (" in problems and
            "its numbers are counted, its contours are not drawn" in problems)
    assert "tversky_a0.5-fold0-seed1" not in problems  # its .hydra is never read
    results = {r["loss"]: r for r in read_csv(sweep / "report" / "results.csv")}
    assert results["bce"]["n_runs"] == "4" and results["tversky_a0.25"]["n_runs"] == "2"
    assert results["tversky_a0.5"]["n_runs"] == "4" and "tversky_a0.75" not in results
    assert (sweep / "report" / "contours.png").exists()


def test_dice_against_alpha_is_drawn_from_the_counted_runs_once_each(tmp_path, monkeypatch):
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    import shutil

    shutil.copytree(sweep / "tversky_a0.5-fold0-seed0", sweep / "zz-copy")  # a duplicate
    write_run(sweep / "tversky_a0.75-fold0-seed0", "tversky_a0.75", 0, 0, {}, status="failed")
    drawn = []
    monkeypatch.setattr(figures, "alpha_curve",
                        lambda a, colours: drawn.append(a) or figures.Figure())
    assert main([str(sweep)]) == 0
    [a] = drawn
    with_alpha = [s for s in a.summaries if np.isfinite(s.alpha)]
    assert [(s.loss, s.alpha, s.n_runs) for s in with_alpha] == [
        ("tversky_a0.25", 0.25, 3), ("tversky_a0.5", 0.5, 3)]  # bce has none; failed: no result
    assert (sweep / "report" / "alpha_search.png").exists()
    assert "![alpha_search](alpha_search.png)" in (sweep / "report" / "results.md").read_text()

    for fold in (0, 1, 2):  # one alpha left: no curve, and none stale
        shutil.rmtree(sweep / f"tversky_a0.25-fold{fold}-seed0")
    monkeypatch.undo()
    assert main([str(sweep)]) == 0
    assert not (sweep / "report" / "alpha_search.png").exists()


def test_the_alpha_figure_stars_nothing_without_a_verdict_and_shows_intervals(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    assert main([str(sweep)]) == 0
    rows = read_long_table(sweep / "report" / "per_patient.csv")
    a = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce")
    figure = figures.alpha_curve(a, figures.loss_colours(
        ["bce", "tversky_a0.25", "tversky_a0.5"], {"tversky_a0.25": 0.25, "tversky_a0.5": 0.5}))
    ax = figure.axes[0]
    assert "No alpha is called best" in ax.get_title()
    assert not any(line.get_marker() == "*" for line in ax.get_lines())
    assert len(ax.collections) >= 2  # the intervals (and the baseline's band)
    best = analyse(rows, ["bce", "tversky_a0.25", "tversky_a0.5"], "bce", all_pairs=True)
    figure = figures.alpha_curve(best, {})
    if any(line.startswith("Best: ") for line in best.verdict):
        assert any(line.get_marker() == "*" for line in figure.axes[0].get_lines())


def test_a_copied_job_is_counted_once(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    import shutil

    shutil.copytree(sweep / "bce-fold0-seed0", sweep / "zz-copy")
    runs = {r.name: r for r in collect_runs(sweep)}
    assert runs["zz-copy"].state == "duplicate"
    assert "same configuration, fold and seed as bce-fold0-seed0" in runs["zz-copy"].reason


def test_flagged_runs_are_said_first_and_not_ranked(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", effects={"bce": 0.0, "tversky_a0.5": 0.03},
                       seeds=(0,))
    for fold in range(3):
        write_run(sweep / f"tversky_a0.25-fold{fold}", "tversky_a0.25", fold, 0,
                  {p: 0.04 for p in PATIENTS[fold::3]}, pred_fraction=1.0)
    assert main([str(sweep), "--all-pairs"]) == 0
    md = (sweep / "report" / "results.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("**Caution: 1 of 3 losses has runs that cannot support a "
                            "conclusion (degenerate: tversky_a0.25;")
    assert "degenerate in 3 of 3 runs (predicts gland in 100% of all voxels)" in md
    verdict = md.split("## Per loss")[0]
    assert "Best" not in verdict and "No loss is called best" not in verdict
    assert "tversky_a0.5 scores higher than bce" in verdict  # the unflagged ones still compared
    flags = {r["loss"]: r["flags"] for r in read_csv(sweep / "report" / "results.csv")}
    assert flags["bce"] == "" and flags["tversky_a0.25"].startswith("degenerate in 3 of 3")
    flagged = {(c["loss"], c["baseline"]): c["flagged"]
               for c in read_csv(sweep / "report" / "comparisons.csv")}
    assert flagged[("tversky_a0.25", "bce")] == "true"
    assert flagged[("tversky_a0.5", "bce")] == "false"


def test_a_loss_whose_runs_still_rose_at_their_end_is_flagged_not_converged(tmp_path):
    """The runs' mean late_gain above 0.01 and above 0 by a t-test over them; a loss whose
    runs stopped early or stayed flat is not flagged."""
    sweep = make_sweep(tmp_path / "sweep", effects={"bce": 0.0, "tversky_a0.5": 0.03},
                       seeds=(0,), stopped_early=False, late_gain=0.004)
    for fold in range(3):
        write_run(sweep / f"tversky_a0.25-fold{fold}", "tversky_a0.25", fold, 0,
                  patient_dice(2, 0, PATIENTS[fold::3], 0.05), stopped_early=False,
                  late_gain=(0.03, 0.025, 0.035)[fold])
    assert main([str(sweep), "--all-pairs"]) == 0
    flags = {r["loss"]: r["flags"] for r in read_csv(sweep / "report" / "results.csv")}
    assert flags["bce"] == flags["tversky_a0.5"] == ""
    assert flags["tversky_a0.25"] == ("not converged: selection Dice still rising at the end, "
                                      "+0.030 over the last quarter of the epochs (mean of 3 "
                                      "runs, above 0 at p = 0.0046; bound 0.01)")
    verdict = (sweep / "report" / "results.md").read_text().split("## Per loss")[0]
    assert "Caution: 1 of 3 losses" in verdict and "not converged: tversky_a0.25" in verdict


def test_a_runs_late_gain_is_read_off_its_selection_curve_by_the_current_rule(tmp_path):
    """results.json keeps the value of the version that trained the run (here an older rule's
    +0.04 for a curve flat at its end); the report judges the curve itself, and falls back on
    results.json only without one."""
    sweep = make_sweep(tmp_path / "sweep", effects={"bce": 0.0}, seeds=(0,),
                       stopped_early=False, late_gain=0.04)
    for fold in range(3):
        write_run(sweep / f"dice-fold{fold}", "tversky_a0.5", fold, 0,
                  patient_dice(1, 0, PATIENTS[fold::3]), stopped_early=False, late_gain=0.04,
                  curve_gain=0.0)
    assert main([str(sweep)]) == 0
    rows = read_csv(sweep / "report" / "results.csv")
    flags = {r["loss"]: r["flags"] for r in rows}
    assert flags["tversky_a0.5"] == "" and flags["bce"].startswith("not converged")
    shutil.rmtree(sweep / "dice-fold0" / "metrics")
    shutil.rmtree(sweep / "report")
    assert main([str(sweep)]) == 0
    long = read_csv(sweep / "report" / "per_patient.csv")
    gains = {r["fold"]: float(r["late_gain"]) for r in long if r["loss"] == "tversky_a0.5"}
    assert gains == {"0": 0.04, "1": 0.0, "2": 0.0}


def test_a_sweep_without_completed_runs_lists_them(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "a", "bce", 0, 0, {}, status="failed")
    assert main([str(sweep)]) == 0
    md = (sweep / "report" / "results.md").read_text()
    assert md.startswith("**No completed run with per-patient results")
    assert "- `a`: failed — RuntimeError: CUDA out of memory" in md


def test_callback_never_fails_the_sweep_and_reads_the_report_settings(tmp_path, caplog):
    callback = SweepReport()
    callback.sweep_dir = callback_dir = tmp_path / "empty"
    callback.sweep_dir.mkdir()
    (callback.sweep_dir / "multirun.yaml").write_text("{}\n")  # Hydra's: the sweep launched
    callback.write()  # but no job started (sbatch refused the array): no report, nothing said
    assert caplog.text == "" and sorted(callback_dir.iterdir()) == [callback_dir / "multirun.yaml"]
    (callback_dir / "0").mkdir()  # a job's folder without its run
    callback.write()  # no exception: logged
    assert "could not write the sweep report" in caplog.text
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    callback = SweepReport()
    callback.on_multirun_start(OmegaConf.create({
        "report": {"baseline": "tversky_a0.25", "all_pairs": True},
        "hydra": {"sweep": {"dir": str(sweep)}}}))
    callback.write()  # refused before launch (no multirun.yaml of its own): nothing written
    assert not (sweep / "report").exists()
    (sweep / "multirun.yaml").write_text("{}\n")
    holder = subprocess.Popen([sys.executable, "-c", (  # another sweep in that folder, now
        "import sys, pathlib; from prostate_seg.runs import RunLock; "
        f"lock = RunLock(pathlib.Path({str(sweep)!r}), what='sweep folder'); lock.acquire(); "
        "print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    callback.write()  # this sweep was refused: the running one's folder is not its to report
    holder.communicate("")
    assert not (sweep / "report").exists()
    callback.write()
    pairs = {(c["loss"], c["baseline"]) for c in read_csv(sweep / "report" / "comparisons.csv")}
    assert pairs == {("bce", "tversky_a0.25"), ("tversky_a0.5", "tversky_a0.25"),
                     ("tversky_a0.5", "bce")}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``, hidden ones too, with a file's bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("option, message", [
    (["--baseline", "foo"], "--baseline foo: no such loss in {sweep} (losses: bce, "
                            "tversky_a0.25, tversky_a0.5)"),
    (["--split", "test2"], "{sweep}: no rows with split=test2 (splits: val)")])
def test_a_refused_report_writes_nothing_and_keeps_the_previous_one(tmp_path, capsys, option,
                                                                   message):
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    assert main([str(sweep), *option]) == 2
    assert capsys.readouterr().err == f"error: {message.format(sweep=sweep)}\n"
    assert not (sweep / "report").exists()
    assert main([str(sweep)]) == 0
    before = snapshot(sweep / "report")
    assert main([str(sweep), *option]) == 2
    assert capsys.readouterr().err.endswith(f"error: {message.format(sweep=sweep)}\n")
    assert snapshot(sweep / "report") == before


def test_a_sweeps_report_from_before_the_record_is_replaced_and_a_users_is_not(tmp_path):
    """SWEEP/report/ of an earlier version has no .written.json: the report's own place, its
    files are the report's; the same names in a folder given by --out are the user's."""
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    assert main([str(sweep)]) == 0
    (sweep / "report" / ".written.json").unlink()
    assert main([str(sweep)]) == 0
    assert (sweep / "report" / ".written.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(sweep / "report", elsewhere)
    (elsewhere / ".written.json").unlink()
    assert main([str(sweep), "--out", str(elsewhere)]) == 2


def test_runs_that_are_no_replicate_are_listed_and_not_counted(tmp_path):
    """One started from another run's weights (ckpt_path), one of debug=overfit: pooled as
    seeds, either would pass for a run of its configuration trained from scratch."""
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    started, debug = sweep / "bce-fold0-seed0", sweep / "bce-fold1-seed0"
    older = sweep / "bce-fold2-seed0"  # started so by a version that kept only resumed_from
    for folder, change in ((started, {"started_from": "/elsewhere/last.ckpt"}),
                           (debug, {"identity": {"config": {"trainer.overfit_batches": 3}}}),
                           (older, {"resumed_from": "/elsewhere/last.ckpt"})):
        status = json.loads((folder / "status.json").read_text())
        if "identity" in change:
            status["identity"]["config"].update(change["identity"]["config"])
        else:
            status.update(change)
        (folder / "status.json").write_text(json.dumps(status))
    runs = {run.name: run for run in report.collect_runs(sweep)}
    assert runs[started.name].state == runs[debug.name].state == runs[older.name].state == (
        "left out")
    assert runs[started.name].reason.startswith("started from /elsewhere/last.ckpt (ckpt_path)")
    assert runs[debug.name].reason.startswith("a debug run (trainer.overfit_batches=3)")
    assert main([str(sweep)]) == 0
    long = read_csv(sweep / "report" / "per_patient.csv")
    assert not {started.name, debug.name, older.name} & {row["run"] for row in long}
    status = json.loads((older / "status.json").read_text())  # resumed from its own: counted
    (older / "status.json").write_text(json.dumps(
        {**status, "resumed_from": str(older / "checkpoints" / "last.ckpt")}))
    assert {r.name: r.state for r in report.collect_runs(sweep)}[older.name] == "completed"


def test_a_report_failing_midway_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    assert main([str(sweep)]) == 0
    before = snapshot(sweep / "report")
    assert main([str(sweep), "--baseline", "tversky_a0.25"]) == 0  # new files, same names
    changed = snapshot(sweep / "report")
    assert changed != before and set(changed) == set(before)

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "write_text", disk_full)  # results.md, the last file written
    with pytest.raises(OSError) as failed:
        report.write_report(sweep)
    assert failed.value.filename == str(sweep / "report" / "results.md")
    assert snapshot(sweep / "report") == changed
    with pytest.raises(OSError):
        report.report_table(sweep / "report" / LONG_TABLE, tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]

# --- table mode -------------------------------------------------------------------------

def write_table(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def minimal_table(path: Path) -> Path:
    """Two tools' results as one would export them: loss, patient, dice, nothing else."""
    lines = [f"{loss},{p},{patient_dice(k, 0, [p], e)[p]}"
             for k, (loss, e) in enumerate((("nnunet", 0.02), ("monai_unet", 0.0)))
             for p in PATIENTS]
    return write_table(path, "loss,patient,dice", lines)


def test_table_mode_with_only_the_required_columns(tmp_path):
    table = minimal_table(tmp_path / "results.csv")
    out = tmp_path / "out"
    result = run_cli("-m", "prostate_seg", "report", "--table", str(table), "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (c,) = read_csv(out / "comparisons.csv")
    # no bce in the table: every pair is compared (monai_unet before nnunet by name)
    assert (c["loss"], c["baseline"], c["n_patients"]) == ("nnunet", "monai_unet", "12")
    expected = [patient_dice(0, 0, [p], 0.02)[p] - patient_dice(1, 0, [p])[p] for p in PATIENTS]
    assert float(c["mean_diff"]) == pytest.approx(np.mean(expected))
    md = (out / "results.md").read_text()
    assert "12 val patients (folds not given × seeds not given)" in md
    assert all(r["hd95_failed"] == "" for r in read_csv(out / "results.csv"))  # not 0: unknown
    assert "## Protocol\n\nThe table's provenance is not known" in md
    assert sorted(p.name for p in out.glob("*.png")) == ["forest.png", "paired.png",
                                                          "scores.png"]


@pytest.mark.parametrize("header, lines, message", [
    ("loss,patient", ["bce,case00"], "missing column dice (it has: loss, patient)"),
    ("loss,patient,dice", ["bce,case00,0.8", "bce,case01,high"],
     "line 3: dice='high' is not a number"),
    ("loss,patient,dice", ["bce,case00,0.8", "bce,case00,0.7"],
     "line 3: duplicate of line 2 (loss=bce, patient=case00, split=val)"),
    ("loss,patient,dice,seed", ["bce,case00,0.8,0", "bce,case00,0.7,1", "bce,case00,0.7,1"],
     "line 4: duplicate of line 3 (loss=bce, seed=1, patient=case00, split=val)"),
    ("loss,patient,dice", ["bce,case00,1.5"], "line 2: dice=1.5 is outside [0, 1]"),
    ("loss,patient,dice", ["bce,case00,nan"], "line 2: dice='nan' is not a number"),
    ("loss,patient,dice", ["bce,case00,inf"], "line 2: dice='inf' is not a finite number"),
    ("loss,patient,dice,hd95,hd95_failed", ["bce,case00,0.8,3.5,0", "bce,case01,0.8,nan,0"],
     "line 3: hd95='nan' is not a number"),
    # an empty cell among filled ones: a run of its own, or a patient left out of a median
    ("loss,fold,seed,patient,dice", ["bce,0,0,case00,0.8", "bce,,0,case01,0.7"],
     "line 3: fold is empty, but other rows have one; fill it, or leave the column out"),
    ("loss,fold,seed,patient,dice", ["bce,0,,case00,0.8", "bce,0,1,case01,0.7"],
     "line 2: seed is empty, but other rows have one; fill it, or leave the column out"),
    ("loss,patient,dice,hd95", ["bce,case00,0.8,3.5", "bce,case01,0.8,"],
     "line 3: hd95 is empty, but other rows have one; fill it, or leave the column out"),
    ("loss,patient,dice", [",case00,0.5"], "line 2: loss is empty"),
    ("loss,patient,dice,stopped_early", ["bce,case00,0.5,maybe"],
     "line 2: stopped_early='maybe' is not true or false"),
    ("loss,patient,dice", ["bce,case00,0.5,extra"], "line 2: more fields than the header has"),
    ("loss,patient,dice,precision,recall", ["bce,case00,0.5,0.6,0.4", "bce,case01,0.5"],
     "line 3: fewer fields than the header has (3 of 5)"),
    ("loss,patient,dice,split", ["bce,case00,0.5,test"], "no rows with split=val (splits: test)"),
    ("loss,patient,dice", [], "no rows below the header"),
    # a row mislabelled with another fold, or the same fold as "0.0", is not a new patient
    ("loss,fold,seed,patient,dice", ["bce,0,0,case00,0.8", "bce,0.0,0,case00,0.7"],
     "line 3: duplicate of line 2 (loss=bce, fold=0, seed=0, patient=case00, split=val)"),
    ("loss,fold,seed,patient,dice", ["bce,0,0,case00,0.8", "bce,1,0,case00,0.7"],
     "line 3: patient case00 of bce seed 0 is in fold 1 here and in fold 0 on line 2; a "
     "validation patient belongs to one fold"),
    ("loss,fold,seed,patient,dice", ["bce,0.5,0,case00,0.8"],
     "line 2: fold='0.5' is not a whole number >= 0"),
    ("loss,fold,seed,patient,dice", ["bce,0,x,case00,0.8"],
     "line 2: seed='x' is not a whole number >= 0"),
    ("loss,patient,dice,hd95,hd95_failed", ["bce,case00,0.8,-5,0"],
     "line 2: hd95=-5 is negative (a distance)"),
    ("loss,patient,dice,hd95,hd95_failed", ["bce,case00,0.8,inf,0"],
     "line 2: hd95=inf without hd95_failed=1 (an undefined HD95 is flagged as failed)"),
    ("loss,patient,dice,hd95_failed", ["bce,case00,0.8,0.5"],
     "line 2: hd95_failed=0.5 is not a whole number >= 0"),
    ("loss,patient,dice,hd95_failed", ["bce,case00,0.8,2"],
     "line 2: hd95_failed=2 is not 0 or 1"),
    ("loss,patient,dice,voxels_pred", ["bce,case00,0.8,-3"],
     "line 2: voxels_pred=-3 is not a whole number >= 0"),
    ("loss,patient,dice,alpha", ["bce,case00,0.8,1.5"], "line 2: alpha=1.5 is outside [0, 1]"),
    # two configurations under one name would be pooled as seeds of one
    ("loss,alpha,seed,patient,dice", ["t,0.3,0,case00,0.8", "bce,,0,case00,0.8",
                                      "t,,1,case00,0.8", "t,0.7,2,case00,0.7"],
     "loss t has alpha 0.3 on line 2 and 0.7 on line 5; give each configuration its own loss "
     "name"),
    ("loss,seed,patient,dice,max_epochs", ["t,0,case00,0.8,50", "t,1,case00,0.8,50.0",
                                           "t,2,case00,0.8,100"],
     "loss t has max_epochs 50 on line 2 and 100 on line 4; give each configuration its own "
     "loss name"),
    ("loss,patient,dice,late_gain", ["bce,case00,0.8,2.5"],
     "line 2: late_gain=2.5 is outside [-2, 2]"),
    ("loss,patient,dice,late_gain", ["bce,case00,0.8,soon"],
     "line 2: late_gain='soon' is not a number"),
])
def test_bad_tables_are_one_line_naming_file_and_row(tmp_path, capsys, header, lines, message):
    table = write_table(tmp_path / "bad.csv", header, lines)
    assert main(["--table", str(table), "--out", str(tmp_path / "out")]) == 2
    where = f"{table} " if message.startswith("line") else f"{table}: "
    assert capsys.readouterr().err == f"error: {where}{message}\n"


def test_a_spreadsheet_csv_with_a_byte_order_mark_is_read(tmp_path):
    table = minimal_table(tmp_path / "t.csv")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    assert main(["--table", str(tmp_path / "bom.csv"), "--out", str(tmp_path / "o")]) == 0


@pytest.mark.parametrize("lines", [["bce,0,0,case00,0.8", "x,0,0,case00,0.8"],
                                   ["bce,0,0,case00,0.8", "x,0,0,case00,0.7",
                                    "bce,1,0,case01,0.6", "x,1,0,case01,0.6"]])
def test_a_single_or_tied_patient_is_reported_not_a_traceback(tmp_path, capsys, lines):
    table = write_table(tmp_path / "t.csv", "loss,fold,seed,patient,dice", lines)
    assert main(["--table", str(table), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    said = ("x and bce not tested (one run pair" if len(lines) == 2 else
            "no difference from bce detected for x")
    assert said in out and "Traceback" not in out


def test_a_design_too_small_for_a_power_says_so_instead_of_a_nan(tmp_path, capsys):
    """One fold, two seeds, two patients, noisy runs: under one degree of freedom."""
    dice = {"bce": (0.7486, 0.7348, 0.7955, 0.8366), "x": (0.6282, 0.6085, 0.8507, 0.7298)}
    lines = [f"{loss},0,{i // 2},{PATIENTS[i % 2]},{value}"
             for loss, values in dice.items() for i, value in enumerate(values)]
    table = write_table(tmp_path / "t.csv", "loss,fold,seed,patient,dice", lines)
    assert main(["--table", str(table), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "o" / "results.md").read_text()
    assert "nan%" not in out and "nan%" not in md
    line = ("The design is too small to estimate the power to detect a difference of 0.02: it "
            "leaves under one degree of freedom. Detecting a difference of 0.02")
    assert line in out and f"\n{line}" in md  # measured, so not in bold

def test_losses_whose_runs_share_no_patient_are_said_unpaired_not_flagged(tmp_path, capsys):
    """tversky's table puts every patient in the other fold: nothing pairs with bce or x."""
    lines = [f"{loss},{(i + swap) % 2},{s},{p},{patient_dice(k, s, [p])[p]}"
             for k, (loss, swap) in enumerate((("bce", 0), ("x", 0), ("tversky", 1)))
             for i, p in enumerate(PATIENTS[:6]) for s in (0, 1)]
    table = write_table(tmp_path / "t.csv", "loss,fold,seed,patient,dice", lines)
    assert main(["--table", str(table), "--out", str(tmp_path / "o"), "--all-pairs"]) == 0
    out = capsys.readouterr().out
    why = ("could not be paired, as no patient was scored by runs of the same fold and seed "
           "under both (their runs come from different splits or seeds)")
    assert f"; tversky and bce {why}." in out
    assert f"Between the other losses: x and tversky {why}." in out
    assert "not tested (no patient pairs: see above)" in out
    assert "unflagged" not in out and "use --all-pairs" not in out


def test_hd95_in_mm_and_px_is_never_one_median(tmp_path):
    """A loss whose runs' datasets differ in known spacing (a scan without orientation among
    them) has no HD95 median; losses that differ in unit each show their own in the table."""
    header = "loss,fold,seed,patient,dice,hd95,hd95_unit"
    lines = [f"{loss},{i % 2},{s},{p},{patient_dice(k, s, [p])[p]},{3 + i},"
             f"{'mm' if loss == 'bce' or s == 0 else 'px'}"
             for k, loss in enumerate(("bce", "x")) for i, p in enumerate(PATIENTS[:6])
             for s in (0, 1)]
    table = write_table(tmp_path / "t.csv", header, lines)
    assert main(["--table", str(table), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| — (mm and px) |" in md and "| 5.50 mm |" in md
    table = write_table(tmp_path / "t.csv", header, [line.replace(",mm", ",px")
                                                     if line.startswith("x,") else line
                                                     for line in lines])
    assert main(["--table", str(table), "--out", str(tmp_path / "o2")]) == 0
    md = (tmp_path / "o2" / "results.md").read_text()
    assert "| HD95 median |" in md and "| 5.50 mm |" in md and "| 5.50 px |" in md


def test_without_bce_the_report_says_how_to_add_the_baseline(tmp_path, capsys):
    lines = [f"{loss},{i % 2},0,case{i:02d},{0.7 + 0.01 * i + 0.02 * k}"
             for k, loss in enumerate(("tversky_a0.25", "tversky_a0.5", "tversky_a0.75"))
             for i in range(6)]
    table = write_table(tmp_path / "t.csv", "loss,fold,seed,patient,dice", lines)
    assert main(["--table", str(table), "--out", str(tmp_path / "o")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("No bce baseline here, so every pair of losses is compared (3 ")
    assert "python train.py -m loss=bce,tversky loss.alpha=..." in first


def test_table_mode_refusals(tmp_path, capsys):
    table = minimal_table(tmp_path / "t.csv")
    assert main(["--table", str(table), "--out", str(tmp_path / "o"), "--baseline", "bce"]) == 2
    assert capsys.readouterr().err == (f"error: --baseline bce: no such loss in {table} "
                                       "(losses: monai_unet, nnunet)\n")
    assert main(["--table", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.csv'}: table not found\n"
    (tmp_path / "empty.csv").write_text("")
    assert main(["--table", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "empty; expected a header with the columns loss, patient, dice" in \
        capsys.readouterr().err
    assert main([str(tmp_path / "no-sweep")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no-sweep'}: sweep folder not found\n"
    (tmp_path / "empty-sweep").mkdir()
    assert main([str(tmp_path / "empty-sweep")]) == 2
    assert "no run folders inside" in capsys.readouterr().err



@pytest.mark.parametrize("name", ["results.csv", "comparisons.csv", "results.md", "forest.png"])
def test_the_report_never_replaces_its_input_table(tmp_path, capsys, name):
    """Whatever the input's name, even reached through a symlinked folder."""
    (tmp_path / "data").mkdir()
    table = minimal_table(tmp_path / "data" / name)
    before = table.read_bytes()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    for given, out in ((table, tmp_path / "data"), (tmp_path / "link" / name, tmp_path / "data"),
                       (table, tmp_path / "link")):
        assert main(["--table", str(given), "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: --out {out}: the report's {name} would "
                                           f"replace the input table {given}; choose another "
                                           "folder\n")
    assert table.read_bytes() == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == [name]

def test_the_report_replaces_only_files_of_its_own_earlier_report(tmp_path, capsys):
    """A file bearing a report's name that no earlier report wrote there, or that was changed
    since, is the user's: refused, naming it, and kept with everything else in the folder."""
    table, out = minimal_table(tmp_path / "t.csv"), tmp_path / "paper"
    out.mkdir()
    mine = {"notes.txt": "mine\n", "contours.png": "my figure\n", "results.md": "my notes\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert main(["--table", str(table), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'results.md'}: not written here by an earlier run of this command, or "
        "changed since; move it, or choose another folder\n")
    assert {p.name: p.read_text() for p in out.iterdir()} == mine
    (out / "results.md").unlink()
    (out / "contours.png").unlink()
    assert main(["--table", str(table), "--out", str(out)]) == 0
    assert main(["--table", str(table), "--out", str(out)]) == 0  # its own files: replaced
    (out / "loss_curves.png").write_text("my curves\n")  # a name this report did not draw
    assert main(["--table", str(table), "--out", str(out)]) == 2
    assert f"error: {out / 'loss_curves.png'}: not written here" in capsys.readouterr().err
    (out / "loss_curves.png").unlink()
    with open(out / "results.csv", "a") as f:
        f.write("an edit\n")
    assert main(["--table", str(table), "--out", str(out)]) == 2
    assert f"error: {out / 'results.csv'}: not written here" in capsys.readouterr().err
    assert (out / "results.csv").read_text().endswith("an edit\n")
    assert (out / "notes.txt").read_text() == "mine\n"


def test_a_sweep_report_goes_to_out_under_the_same_rules(tmp_path, capsys):
    """--out keeps the sweep's own report; a run folder's per_patient.csv is not the report's."""
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    assert main([str(sweep), "--out", str(tmp_path / "alt")]) == 0
    assert not (sweep / "report").exists()
    assert (tmp_path / "alt" / "results.md").is_file()
    assert len(read_csv(tmp_path / "alt" / LONG_TABLE)) == 3 * len(PATIENTS)
    run = sweep / "bce-fold0-seed0"
    before = snapshot(run)
    assert main([str(sweep), "--out", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run / LONG_TABLE}: not written here")
    assert snapshot(run) == before


def test_an_out_that_cannot_be_a_folder_is_one_line_and_nothing_written(tmp_path, capsys):
    table = minimal_table(tmp_path / "t.csv")
    (tmp_path / "file").write_text("mine\n")
    assert main(["--table", str(table), "--out", str(tmp_path / "file" / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'}: Not a directory (ENOTDIR)\n"
    (make_sweep(tmp_path / "sweep", seeds=(0,)) / "report").write_text("mine\n")
    assert main([str(tmp_path / "sweep")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'sweep' / 'report'}: ")
    assert (tmp_path / "file").read_text() == (tmp_path / "sweep" / "report").read_text() == \
        "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "sweep", "t.csv"]

def test_test_patients_are_a_separate_family(tmp_path):
    header = "loss,patient,dice,split,seed"
    lines = [f"{loss},{p},{patient_dice(k, s, [p], e)[p]},{split},{s}"
             for k, (loss, e) in enumerate((("bce", 0.0), ("tversky_a0.5", 0.03)))
             for split in ("val", "test") for s in (0, 1) for p in PATIENTS]
    out = tmp_path / "out"
    report_table(write_table(tmp_path / "t.csv", header, lines), out)
    splits = [(c["split"], c["loss"]) for c in read_csv(out / "comparisons.csv")]
    assert splits == [("val", "tversky_a0.5"), ("test", "tversky_a0.5")]
    md = (out / "results.md").read_text()
    assert "## test: test patients, a separate family of comparisons" in md
    assert "On 12 test patients (folds not given × 2 seeds)" in md


# --- figures ----------------------------------------------------------------------------

def labelled(figure) -> bool:
    """Every visible axes has axis labels, and the figure has a key."""
    axes = [ax for ax in figure.axes if ax.get_visible() and ax.axison]
    keyed = bool(figure.legends) or any(ax.get_legend() for ax in axes)
    return keyed and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)


def test_figures_show_every_point_and_have_keys(tmp_path):
    rows = [{"loss": loss, "patient": p, "seed": "0", "fold": str(i % 2), "split": "val",
             "dice": d, "precision": d, "recall": d, "hd95": 1.0, "hd95_failed": 0.0}
            for loss, values in (("bce", [0.85, 0.86, 0.88, 0.09]),
                                 ("tversky_a0.5", [0.87, 0.9, 0.91, 0.1]))
            for i, (p, d) in enumerate(zip(PATIENTS, values))]
    analysis = analyse(rows, ["bce", "tversky_a0.5"], "bce")
    colours = figures.loss_colours(["bce", "tversky_a0.5"], {"tversky_a0.5": 0.5})
    for figure in (figures.scores(rows, analysis, colours), figures.paired(analysis, colours),
                   figures.forest(analysis)):
        assert labelled(figure)
        for ax in figure.axes:
            if ax.get_ylabel().endswith("(per volume)") or ax.get_ylabel().startswith("per-"):
                low, high = ax.get_ylim()
                assert low < 0.09 and high > 0.91  # the failed patient is on the plot
    forest = figures.forest(analysis)
    low, high = forest.axes[0].get_xlim()
    c = analysis.comparisons[0]
    assert low < min(c.ci_low, 0) and high > max(c.ci_high, c.mean_diff)


def test_contour_grid_draws_gland_everywhere_and_says_predicted_nothing(tmp_path):
    yy, xx = np.mgrid[:32, :32]
    mask = (((yy - 16) ** 2 + (xx - 16) ** 2) < 49).astype(np.uint8)[None]
    image = (mask * 0.5).astype(np.float16)
    columns = [figures.ContourColumn(label=name, run=name, dice=dice, image=image, mask=mask,
                                     prob=prob.astype(np.float16), names=np.array(["s0"]))
               for name, dice, prob in (("everywhere", 0.05, np.ones_like(mask)),
                                        ("nothing", 0.0, np.zeros_like(mask)),
                                        ("good", 0.9, mask))]
    figure = figures.contours(columns)
    everywhere, nothing, good = figure.axes[1:4]
    assert "everywhere\nval Dice 0.050\nslice Dice" in everywhere.get_title()
    red = [c for c in everywhere.collections if "red" in str(c.get_edgecolor()) or
           np.allclose(np.asarray(c.get_edgecolor())[..., :3], [1, 0, 0])]
    assert red, "a model that predicts gland everywhere still gets a red outline"
    assert [t.get_text() for t in nothing.texts] == ["predicted\nnothing"]
    assert not good.texts and "slice Dice 1.000" in good.get_title()
    assert figure.legends


def test_a_truncated_preview_file_is_a_note_not_a_crash(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", effects={"bce": 0.0, "tversky_a0.5": 0.0},
                       seeds=(0,), folds=1)
    preview = sweep / "bce-fold0-seed0" / "val_preview.npz"
    with zipfile.ZipFile(preview, "w") as z:  # a valid zip, but the arrays are missing
        z.writestr("other.npy", b"")
    assert main([str(sweep)]) == 0
    assert "`bce-fold0-seed0`: val_preview.npz unreadable" in \
        (sweep / "report" / "results.md").read_text()


def test_long_table_reader_names_the_file_and_line(tmp_path):
    from prostate_seg.study.report import read_long_table

    table = write_table(tmp_path / "t.csv", "loss,patient,dice,hd95",
                        ["bce,case00,0.8,", "bce,case01,0.7,abc"])
    with pytest.raises(DataError, match=r"t\.csv line 3: hd95='abc' is not a number"):
        read_long_table(table)
    table = write_table(tmp_path / "t.csv", "loss,fold,seed,patient,dice,hd95",
                        ["bce,,,case00,0.8,", "bce,,,case01,0.7,"])  # empty on every row:
    assert [row["fold"] for row in read_long_table(table)] == ["", ""]  # as if left out


def test_runs_of_different_code_are_refused_unless_pooled_on_request(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep", seeds=(0,))
    folder = sweep / "bce-fold1-seed0"
    status = json.loads((folder / "status.json").read_text())
    for path in sweep.glob("*/status.json"):
        other = json.loads(path.read_text())
        commit = "bbbbbbbbbbbb" if path.parent == folder else "aaaaaaaaaaaa"
        other["identity"]["config"].update({"code.version": "0.1.0", "code.commit": commit,
                                            "code.dirty": False})
        path.write_text(json.dumps(other))
    assert status["status"] == "completed"
    assert main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sweep}: runs made by different code: 8 by 0.1.0 commit "
                          "aaaaaaaaaaaa; 1 by 0.1.0 commit bbbbbbbbbbbb;")
    assert "--allow-mixed-code" in err and err.count("\n") == 1
    assert main([str(sweep), "--allow-mixed-code"]) == 0
    md = (sweep / "report" / "results.md").read_text()
    assert md.startswith("**Pooled on request (--allow-mixed-code): runs made by different code")
    results = {r["loss"]: r for r in read_csv(sweep / "report" / "results.csv")}
    assert results["bce"]["n_runs"] == "3"  # one bce, not two groups told apart by their code
