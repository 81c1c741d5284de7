"""Logs in files: one line per epoch with the key metrics, no progress-bar frames."""

import re
import sys

import pytest
from helpers import TINY, compose_train, run_cli
from pytorch_lightning.callbacks import ProgressBar

from prostate_seg.training.checks import check_train_config
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
    # the Trainer's own switch leaves the bar out (Lightning refuses a bar beside it)
    quiet = compose_train([*TINY, f"data.dir={prepared}", "+trainer.enable_progress_bar=false"],
                          tmp_path / "quiet")
    check_train_config(quiet)
    assert not _bars(build_run(quiet)[2])


def test_a_run_writes_one_line_per_epoch_and_no_bar_frames(prepared, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *TINY, f"data.dir={prepared}", "trainer.max_epochs=2",
                     "callbacks.progress_bar.refresh_rate=1", "verbose=true",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert [int(m.group(1)) for m in EPOCH_LINE.finditer(log)] == [0, 1]
    assert "\r" not in result.stdout + result.stderr + log
    assert "GPU available" in result.stdout  # verbose: Lightning's messages on the console too


NOISE = ("GPU available", "TPU available", "Tip:", "┏", "Trainable params", "srun",
         "Restoring states", "UserWarning")


@pytest.mark.slow  # two jobs in this process
def test_a_sweep_console_says_job_k_of_n_and_keeps_lightnings_noise_in_the_logs(prepared,
                                                                               tmp_path):
    common = [*TINY, f"data.dir={prepared}", "trainer.max_epochs=2"]
    result = run_cli("train.py", "-m", "loss=bce,dice", *common, "~hydra.callbacks.sweep_report",
                     f"hydra.sweep.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) <= 2 * 12 + 1, result.stdout
    assert re.search(r"job 1/2 started: bce-fold0-seed0", result.stdout)
    assert re.search(r"job 2/2 done in \d+ s: dice-fold0-seed0; elapsed ", result.stdout)
    assert re.search(r"job 1/2 done in \d+ s: bce-fold0-seed0; elapsed .*, about \d+ s left",
                     result.stdout)
    assert len([line for line in lines if EPOCH_LINE.search(line)]) == 4  # kept, per epoch
    console = result.stdout + result.stderr
    assert not [word for word in NOISE if word in console], console
    log = (tmp_path / "a" / "bce-fold0-seed0" / "train.log").read_text()
    assert "GPU available" in log and "Trainable params" in log  # still in the log file


@pytest.mark.slow  # the gpu_pool launcher and its child processes
def test_a_pool_sweep_names_each_job_and_a_failed_one_in_one_line_naming_its_log(prepared,
                                                                                 tmp_path):
    """Job k/N on its device, per-epoch lines in each job's log (no bar frames), and a job
    that fails (it cannot write its checkpoint: a file where its folder should be) is one
    console line with its log's path while the other finishes; the sweep's error is one line."""
    sweep = tmp_path / "sweep"
    (tmp_path / "in-the-way").write_text("")
    result = run_cli("train.py", "-m", *TINY, f"data.dir={prepared}", "trainer.max_epochs=2",
                     "callbacks.progress_bar.refresh_rate=1",
                     f"callbacks.model_checkpoint.dirpath={tmp_path / 'ok'},"
                     f"{tmp_path / 'in-the-way' / 'ckpt'}",
                     "hydra/launcher=gpu_pool", "hydra.launcher.accelerator=cpu",
                     "~hydra.callbacks.sweep_report", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2
    assert re.search(r"job 1/2 started on cpu 0: ", result.stdout)
    assert len(result.stdout.splitlines()) <= 2 * 12, result.stdout
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and re.search(r"job \d/2 FAILED after \d+ s: .*in-the-way", failed[0])
    (bad,) = [p for p in sweep.iterdir() if p.name.endswith("ckpt")]
    assert f"(log: {bad / 'launcher.log'})" in failed[0]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 2 jobs failed (each named "
                                                     "above"), result.stderr
    (good,) = [p for p in sweep.iterdir() if p.name.endswith("ok")]
    assert (good / "results.json").exists()  # the other one finished
    assert re.search(r"job \d/2 done in \d+ s on cpu 0: ", result.stdout)
    log = (good / "launcher.log").read_text()
    assert [int(m.group(1)) for m in EPOCH_LINE.finditer(log)] == [0, 1] and "\r" not in log
