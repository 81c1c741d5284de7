"""The study as sweeps: paper experiment at demo size with its report, submitit, DDP on CPU."""

import csv
import json

import pytest
from helpers import TINY, run_cli

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
    # Every job is in the report: counted (its rows in the long table) or listed with why not.
    report = sweep / "report"
    md = (report / "results.md").read_text()
    counted = set()
    if (report / "per_patient.csv").exists():
        with open(report / "per_patient.csv", newline="") as f:
            counted = {row["run"] for row in csv.DictReader(f)}
    assert all(name in counted or f"- `{name}`: " in md for name in folders)
    hparams = (sweep / "tversky_a0.25-seed1" / "hparams.yaml").read_text()
    assert "alpha: 0.25" in hparams and "beta: 0.75" in hparams and "seed: 1" in hparams


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
