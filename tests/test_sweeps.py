"""The study as sweeps: paper experiment at demo size with its report, submitit, DDP on CPU."""

import csv
import json

import numpy as np
import pytest
from helpers import TINY, run_cli

from prostate_seg.report import collect_runs, significance_line, summarize

SMALL = [o for o in TINY if not o.startswith(("model=", "trainer="))]


@pytest.mark.slow
def test_paper_experiment_at_demo_size_and_its_report(prepared_copy, tmp_path):
    sweep = tmp_path / "paper"
    result = run_cli("train.py", "-m", "experiment=paper", f"data.dir={prepared_copy}",
                     "model=unet_small", "trainer=cpu", *SMALL, "seed=0,1",
                     "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    losses = ["bce"] + [f"tversky_a{a}" for a in ("0.25", "0.35", "0.45", "0.5", "0.65",
                                                  "0.75", "0.85")]
    assert folders == sorted(f"{loss}-seed{s}" for loss in losses for s in (0, 1))
    with open(sweep / "report" / "results.csv", newline="") as f:
        rows = {r["loss"]: r for r in csv.DictReader(f)}
    assert list(rows) == losses  # bce first, then by alpha
    for loss, row in rows.items():
        logged = [json.loads((sweep / f"{loss}-seed{s}" / "results.json").read_text())
                  for s in (0, 1)]
        for key in ("val/dice", "val/dice_global", "val/precision", "val/recall", "val/f1"):
            values = [r[key] for r in logged]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
        assert row["completed"] == "2" and row["failed"] == "0"
    md = (sweep / "report" / "results.md").read_text()
    assert "| bce |" in md and "Best per-volume Dice" in md and "seed spread" in md
    for figure in ("loss_curves", "precision_recall", "dice_f1", "contours"):
        assert (sweep / "report" / f"{figure}.png").stat().st_size > 10_000
    hparams = (sweep / "tversky_a0.25-seed1" / "hparams.yaml").read_text()
    assert "alpha: 0.25" in hparams and "beta: 0.75" in hparams and "seed: 1" in hparams


def test_report_marks_failed_and_unfinished_runs(trained_run, tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    for name in ("good", "failed", "unfinished"):
        shutil.copytree(trained_run, sweep / name)
        (sweep / name / ".hydra").mkdir(exist_ok=True)
        (sweep / name / ".hydra" / "config.yaml").write_text(
            f"loss:\n  name: {name}\n  alpha: 0.5\nseed: 0\n")
    # as Hydra saves it: the name still an interpolation through the project's resolver
    (sweep / "good" / ".hydra" / "config.yaml").write_text(
        "loss:\n  name: ${ps.tversky_name:${.alpha},${.beta}}\n  alpha: 0.5\n  beta: null\nseed: 0\n")
    status = json.loads((sweep / "failed" / "status.json").read_text())
    (sweep / "failed" / "status.json").write_text(json.dumps(
        {**status, "status": "failed", "error": "RuntimeError: CUDA out of memory"}))
    (sweep / "unfinished" / "results.json").unlink()
    (sweep / "unfinished" / "status.json").write_text(json.dumps({"status": "running"}))
    result = run_cli("-m", "prostate_seg.report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    md = (sweep / "report" / "results.md").read_text()
    assert "`failed`: failed — RuntimeError: CUDA out of memory" in md
    assert "`unfinished`: unfinished" in md and "1 FAILED" in md and "1 unfinished" in md
    assert {r.status for r in collect_runs(sweep)} == {"completed", "failed", "unfinished"}
    assert "| tversky_a0.5 |" in md


def test_significance_line_compares_against_the_seed_spread():
    def row(name, values):
        return {"loss": name, "values": {"val/dice": values}, "val/dice": summarize(values)}

    clear = [row("a", [0.90, 0.91, 0.905]), row("b", [0.70, 0.71, 0.705])]
    assert "its lead over 1 of 1 other losses exceeds the seed spread" in significance_line(clear)
    noisy = [row("a", [0.90, 0.70, 0.80]), row("b", [0.79, 0.81, 0.78])]
    assert "over b (p=" in significance_line(noisy) and "it does not" in significance_line(noisy)
    single = [row("a", [0.9]), row("b", [0.8])]
    assert "seed spread is unknown" in significance_line(single)
    ci = summarize([0.8, 0.9, 1.0])
    assert ci["ci_low"] == pytest.approx(0.9 - 4.302653 * 0.1 / np.sqrt(3), abs=1e-6)


@pytest.mark.slow
def test_submitit_local_sweep(prepared_copy, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", "hydra/launcher=submitit_local", "experiment=demo",
                     f"data.dir={prepared_copy}", *SMALL, "trainer.max_epochs=1",
                     "loss=bce,dice", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${loss.name}",
                     "hydra.launcher.timeout_min=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("bce", "dice"):
        assert json.loads((sweep / name / "status.json").read_text())["status"] == "completed"
        assert (sweep / name / "checkpoints" / "last.ckpt").exists()
    assert list((sweep / ".submitit").iterdir())  # really went through submitit


@pytest.mark.slow
def test_ddp_cpu_fit_runs_two_processes(prepared_copy, tmp_path):
    run_dir = tmp_path / "ddp"
    result = run_cli("train.py", "trainer=ddp_cpu", f"data.dir={prepared_copy}", *SMALL,
                     "model=unet_small", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_trained"] == 2 and 0.0 <= results["val/dice"] <= 1.0
