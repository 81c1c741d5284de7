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
                     "model=unet_small", "trainer=cpu", *SMALL, "data.folds=2", "study.seeds=[0]",
                     "loss.alpha=0.25,0.85",  # the command line narrows the paper's sweep
                     "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    losses = ["bce", "tversky_a0.25", "tversky_a0.85"]
    assert folders == sorted(f"{loss}-fold{k}-seed0" for loss in losses for k in (0, 1))
    # The report's long table is every run's per_patient.csv: each patient once per loss
    # (cross-validation: each patient validates in exactly one fold).
    with open(sweep / "report" / "per_patient.csv", newline="") as f:
        long = list(csv.DictReader(f))
    for folder in folders:
        with open(sweep / folder / "per_patient.csv", newline="") as f:
            own = [(r["patient"], r["dice"]) for r in csv.DictReader(f)]
        assert own == [(r["patient"], r["dice"]) for r in long if r["run"] == folder]
    patients = sorted({r["patient"] for r in long})
    assert len(patients) == 8
    for loss in losses:
        assert sorted(r["patient"] for r in long if r["loss"] == loss) == patients
    with open(sweep / "report" / "comparisons.csv", newline="") as f:
        comparisons = list(csv.DictReader(f))
    assert sorted(c["loss"] for c in comparisons) == sorted(losses[1:])
    assert all(c["baseline"] == "bce" and c["n_patients"] == "8" for c in comparisons)
    md = (sweep / "report" / "results.md").read_text()
    assert "On 8 val patients (2 folds × 1 seed" in md
    alphas = {f: json.loads((sweep / f / "results.json").read_text())["alpha"] for f in folders}
    assert {f.split("-")[0]: a for f, a in alphas.items()} == {  # alpha applies where it can
        "bce": None, "tversky_a0.25": 0.25, "tversky_a0.85": 0.85}
    hparams = (sweep / "tversky_a0.25-fold1-seed0" / "hparams.yaml").read_text()
    assert "alpha: 0.25" in hparams and "beta: 0.75" in hparams and "fold: 1" in hparams


@pytest.mark.extra  # submitit, the SLURM launcher's library, run locally
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
