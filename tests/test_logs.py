"""Logs in files: one line per epoch with the key metrics, no progress-bar frames."""

import re
import sys

import pytest
from helpers import TINY, compose_train, run_cli
from pytorch_lightning.callbacks import ProgressBar

from prostate_seg.training.fit import build_run

EPOCH_LINE = re.compile(r"epoch (\d+)/2: train/loss \d\.\d{4}, select/loss \d\.\d{4}, "
                        r"select/dice \d\.\d{4}, lr 0\.003, \d+\.\d s")


def _bars(trainer) -> list:
    return [c for c in trainer.callbacks if isinstance(c, ProgressBar)]


def test_progress_bar_only_on_a_terminal(prepared, tmp_path, monkeypatch):
    cfg = compose_train([*TINY, f"data.dir={prepared}"], tmp_path / "run")
    assert not _bars(build_run(cfg)[2])  # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert len(_bars(build_run(cfg)[2])) == 1


def test_a_run_writes_one_line_per_epoch_and_no_bar_frames(prepared, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *TINY, f"data.dir={prepared}", "trainer.max_epochs=2",
                     "callbacks.progress_bar.refresh_rate=1", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert [int(m.group(1)) for m in EPOCH_LINE.finditer(log)] == [0, 1]
    assert "\r" not in result.stdout + result.stderr + log


@pytest.mark.slow  # a sweep: the launcher and its child process
def test_a_sweep_job_log_has_the_epoch_lines(prepared, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", *TINY, f"data.dir={prepared}", "trainer.max_epochs=2",
                     "callbacks.progress_bar.refresh_rate=1", "seed=0",
                     "hydra/launcher=gpu_pool", "hydra.launcher.accelerator=cpu",
                     "~hydra.callbacks.sweep_report", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (job,) = [p for p in sweep.iterdir() if (p / "launcher.log").exists()]
    log = (job / "launcher.log").read_text()
    assert [int(m.group(1)) for m in EPOCH_LINE.finditer(log)] == [0, 1]
    assert "\r" not in log
