"""The debug= configs (lightning-hydra-template's): each composes and runs; fast_dev_run ends a
run and a sweep's report cleanly without a best checkpoint; overfit fits a few batches; what
changes a result is part of the run's identity, what only measures is not."""

import json

import pytest
from helpers import TINY, compose_train, run_cli

from prostate_seg.runs import config_identity, read_history
from prostate_seg.training.fit import NO_BEST_CHECKPOINT, train


def test_debug_runs_write_under_outputs_debug(tmp_path):
    cfg = compose_train(["debug=fast_dev_run", "data.dir=."], tmp_path)
    assert cfg.hydra.run.dir.startswith("outputs/debug/runs/")
    assert cfg.hydra.sweep.dir.startswith("outputs/debug/sweeps/")


@pytest.mark.slow
def test_fast_dev_run_sweep_ends_with_a_report_saying_why_runs_have_no_scores(prepared_copy,
                                                                               tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("optimizer.lr=")]
    result = run_cli("train.py", "-m", "debug=fast_dev_run", f"data.dir={prepared_copy}", *tiny,
                     "loss=tversky,dice", "loss.alpha=0.3", "optimizer.lr=1e-3,3e-3",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in sweep.iterdir() if p.name != "report" and p.is_dir())
    # values as Hydra parses them, as ${ps.job_name:} names a job outside this sweeper; dice
    # has no alpha (it is 0.5), so its jobs are without it
    assert [r.name for r in runs] == [f"{loss}-fold0-seed0-lr{lr}" for loss in
                                      ("dice", "tversky_a0.3") for lr in (0.001, 0.003)]
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert results["epochs_trained"] == 1 and results["not_evaluated"] == NO_BEST_CHECKPOINT
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        assert not (run / "per_patient.csv").exists() and not list(run.glob("checkpoints/*"))
    report = (sweep / "report" / "results.md").read_text()
    assert report.count(NO_BEST_CHECKPOINT) == 4


def test_overfit_drives_the_training_loss_down_on_a_few_batches(prepared, tmp_path):
    cfg = compose_train([*TINY, "debug=overfit", f"data.dir={prepared}", "trainer.max_epochs=12",
                         "loss=bce", "optimizer.lr=1e-2"], tmp_path)
    results = train(cfg)
    assert results["epochs_trained"] == 12 and not results["stopped_early"]  # no early stop
    losses = [row["train/loss"] for row in read_history(tmp_path)]
    assert losses[-1] < 0.4 * losses[0], losses  # 0.79 -> 0.20 when written


def test_profiler_writes_its_report_into_the_run_folder(prepared, tmp_path):
    cfg = compose_train([*TINY, "debug=profiler", f"data.dir={prepared}"], tmp_path)
    train(cfg)
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "Total" in report


@pytest.mark.parametrize("debug, same", [("fast_dev_run", False), ("overfit", False),
                                         ("profiler", True)])
def test_a_debug_setting_is_part_of_the_identity_only_when_it_changes_the_result(debug, same,
                                                                                   tmp_path):
    """A profiled run computes what the plain run computes (same identity: a sweep may
    continue it); a fast_dev_run or overfit run does not, so it is never resumed, skipped or
    pooled as the real one."""
    def identity(*extra):
        return config_identity(compose_train(["data.dir=.", "trainer.max_epochs=1", *extra],
                                             tmp_path), "data", "split").hash

    assert (identity(f"debug={debug}") == identity()) is same
