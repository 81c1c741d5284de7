"""A refused command changes nothing: every refusal of a run, a resume, a sweep or a second
process leaves every file of the folders involved byte-identical, and removes only what the
refused command itself created."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY, run_cli

from prostate_seg.runs import RunLock

RUN = [*TINY, "trainer.max_epochs=1"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with the digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory) -> Path:
    """A run folder as the command line leaves it: .hydra/, train.log, results, checkpoints."""
    run_dir = tmp_path_factory.mktemp("refusals") / "run"
    result = run_cli("train.py", *RUN, f"data.dir={prepared}", f"hydra.run.dir={run_dir}",
                     cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def refused(*args: str, cwd: Path) -> str:
    result = run_cli(*args, cwd=cwd)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    return line


@pytest.mark.slow
def test_every_refusal_leaves_the_folders_as_they_were(finished, prepared, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").stat().st_size
    before = snapshot(run_dir)
    base = ["train.py", *RUN, f"data.dir={prepared}", f"hydra.run.dir={run_dir}"]

    # another config in a completed run's folder
    line = refused(*base, "optimizer.lr=0.05", cwd=tmp_path)
    assert "optimizer.lr: 0.003 -> 0.05" in line and snapshot(run_dir) == before

    # a last.ckpt of another config to resume from (the run did not complete)
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    interrupted = snapshot(run_dir)
    line = refused(*base, "seed=7", cwd=tmp_path)
    assert "last.ckpt was made with another config" in line and snapshot(run_dir) == interrupted

    # a second process in a folder another one works in (the lock is held here)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        held = snapshot(run_dir)
        line = refused(*base, cwd=tmp_path)
        assert "run folder in use by pid" in line and snapshot(run_dir) == held
    finally:
        lock.release()

    # a bad value: nothing of the folder is read or written
    line = refused(*base, "loss.alpha=1.5", cwd=tmp_path)
    assert line.startswith("error: loss.alpha=1.5") and snapshot(run_dir) == held
    # (a new folder the refused command made itself goes again: test_faults)


@pytest.mark.slow
def test_a_refused_sweep_leaves_the_running_sweep_as_it_was(finished, prepared, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(finished, sweep / "tversky_a0.5-fold0-seed0")  # the default loss
    (sweep / "report").mkdir()
    (sweep / "report" / "results.md").write_text("the running sweep's report\n")
    lock = RunLock(sweep, what="sweep folder")
    lock.acquire()  # the running sweep
    try:
        before = snapshot(sweep)
        line = refused("train.py", "-m", "loss=bce,tversky", *RUN, f"data.dir={prepared}",
                       f"hydra.sweep.dir={sweep}", cwd=tmp_path)
        assert "sweep folder in use by pid" in line and snapshot(sweep) == before
    finally:
        lock.release()
    # a job folder that holds another configuration's run: refused before any job starts
    before = snapshot(sweep)
    line = refused("train.py", "-m", "loss=bce,tversky", *RUN, "optimizer.lr=0.05",
                   f"data.dir={prepared}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert "tversky_a0.5-fold0-seed0" in line and "optimizer.lr: 0.003 -> 0.05" in line
    assert snapshot(sweep) == before
