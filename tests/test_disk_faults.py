"""Full, read-only or wrong disks: files written whole or not at all, the run's status says what
happened, and every tool reports an OSError in one line naming the path, with exit code 2.

We run as root, so permission bits stop nothing: the faults are a file where a folder is
expected, names longer than the file system allows, and monkeypatched writes that fail with
ENOSPC / EROFS the way a full or read-only disk makes them fail.
"""

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_train, run_cli

from prostate_seg import cli
from prostate_seg.errors import error_line
from prostate_seg.files import write_json
from prostate_seg.training.fit import train


def _within(path, folder: Path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).resolve().is_relative_to(folder)


@pytest.fixture
def full_checkpoint_disk(tmp_path, monkeypatch):
    """The run folder lies on its own disk, which fills up once the first last.ckpt is there:
    every later checkpoint write into it stops half-way with ENOSPC; renames between folders
    fail with EXDEV as between two disks (so a temporary written elsewhere must be copied)."""
    ckpt_dir = (tmp_path / "run" / "checkpoints").resolve()
    real_save, real_copyfile = torch.save, shutil.copyfile
    real_rename, real_replace = os.rename, os.replace

    def full() -> bool:
        return (ckpt_dir / "last.ckpt").exists()

    def half_then_enospc(data: bytes, target) -> None:
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(obj, f, *args, **kwargs):
        if full() and _within(f, ckpt_dir):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            half_then_enospc(buffer.getvalue(), f)
        return real_save(obj, f, *args, **kwargs)

    def copyfile(src, dst, *args, **kwargs):
        if full() and _within(dst, ckpt_dir):
            half_then_enospc(Path(src).read_bytes(), dst)
        return real_copyfile(src, dst, *args, **kwargs)

    def across_disks(real):
        def move(src, dst, *args, **kwargs):
            if _within(dst, ckpt_dir) and Path(src).resolve().parent != Path(dst).resolve().parent:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), str(dst))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    monkeypatch.setattr(os, "rename", across_disks(real_rename))
    monkeypatch.setattr(os, "replace", across_disks(real_replace))
    return ckpt_dir


def test_a_full_disk_never_leaves_a_truncated_checkpoint(full_checkpoint_disk, prepared,
                                                         tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=3",
                         "callbacks.early_stopping.patience=10"], run_dir)
    with pytest.raises(OSError) as info:
        train(cfg)
    files = sorted(full_checkpoint_disk.iterdir())
    for path in files:  # every checkpoint there is whole: the one of epoch 0
        assert torch.load(path, weights_only=False)["epoch"] == 0
    assert [p.name for p in files if not p.name.startswith("best-")] == ["last.ckpt"]  # no temp
    assert info.value.errno == errno.ENOSPC
    assert Path(info.value.filename).parent == full_checkpoint_disk  # names the checkpoint
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    assert "last.ckpt" in status["error"] or "best-" in status["error"]


def test_checkpoints_go_through_the_atomic_writer(prepared, tmp_path):
    from prostate_seg.training.fit import AtomicCheckpointIO, build_run

    cfg = compose_train([*TINY, f"data.dir={prepared}"], tmp_path / "run")
    _, _, trainer = build_run(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_status_that_cannot_be_written_ends_the_run_with_the_error_on_stderr(
        full_checkpoint_disk, prepared, tmp_path, monkeypatch, capsys):
    """The run fails (disk full) and status.json cannot be updated either: the process must
    not end as if nothing happened, leaving "running" behind unexplained."""
    import prostate_seg.runs as runs

    real_write = runs.write_json

    def write_json(path, payload):
        if payload.get("status") != "running":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, payload)

    monkeypatch.setattr(runs, "write_json", write_json)
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=3",
                         "callbacks.early_stopping.patience=10"], run_dir)
    with pytest.raises(SystemExit) as info:
        cli._run(train, cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run_dir / 'status.json'}: No space left on device (ENOSPC)"


def test_a_failed_write_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_json(target, {"dice": 0.8})

    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), str(dst))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as info:
        write_json(target, {"dice": 0.9})
    assert info.value.filename == str(target) and info.value.errno == errno.EROFS
    assert json.loads(target.read_text()) == {"dice": 0.8}
    assert sorted(tmp_path.iterdir()) == [target]
    long_name = tmp_path / ("r" * 250 + ".json")  # fits, but a temporary named after it would not
    monkeypatch.undo()
    write_json(long_name, {"dice": 0.7})
    assert json.loads(long_name.read_text()) == {"dice": 0.7}


@pytest.mark.parametrize("errno_code", [errno.ENOSPC, errno.EROFS, errno.ENOTDIR,
                                        errno.ENAMETOOLONG, errno.EACCES])
def test_os_errors_are_one_line_naming_the_path(errno_code):
    error = OSError(errno_code, os.strerror(errno_code), "/data/run/last.ckpt")
    assert error_line(error) == (f"/data/run/last.ckpt: {os.strerror(errno_code)} "
                                     f"({errno.errorcode[errno_code]})")
    wrapped = ValueError("Unable to configure handler 'file'")
    wrapped.__cause__ = error  # how logging reports a log file it cannot open
    assert error_line(wrapped) == error_line(error)
    assert error_line(KeyError("a bug")) is None  # keeps its traceback


# --- every tool, from the command line ---------------------------------------------------------
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("a file where a folder is expected")
    return path


def _one_line_exit_2(result, path: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    # (a run that started logs to stderr too: the error is its last line)
    assert result.stderr.strip().splitlines()[-1] == f"error: {path}: Not a directory (ENOTDIR)"
    assert "Traceback" not in result.stderr + result.stdout


def test_prepare_cli(phantoms, a_file, tmp_path):
    result = run_cli("-m", "prostate_seg", "prepare", f"input_dir={phantoms}",
                     f"output_dir={a_file}/prepared", "image_size=16", cwd=tmp_path)
    _one_line_exit_2(result, a_file)


def test_train_cli_when_the_run_folder_cannot_be_made(prepared, a_file, tmp_path):
    result = run_cli("train.py", *TINY, f"data.dir={prepared}", f"hydra.run.dir={a_file}/run",
                     cwd=tmp_path)
    _one_line_exit_2(result, Path(f"{a_file}/run"))


def test_train_cli_when_a_checkpoint_cannot_be_written(prepared, a_file, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *TINY, f"data.dir={prepared}", "trainer.max_epochs=1",
                     f"callbacks.last_checkpoint.dirpath={a_file}/checkpoints",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _one_line_exit_2(result, a_file)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "Not a directory" in status["error"]


def test_evaluate_cli(trained_run, a_file, tmp_path):
    ckpt = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    result = run_cli("evaluate.py", f"ckpt_path={ckpt}", f"output={a_file}/eval.csv",
                     cwd=tmp_path)
    _one_line_exit_2(result, a_file)


def test_predict_cli(trained_run, phantoms, a_file, tmp_path):
    result = run_cli("predict.py", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                     f"input={phantoms / 'images' / 'phantom000.nii.gz'}",
                     f"output={a_file}/masks/mask.nii.gz", cwd=tmp_path)
    _one_line_exit_2(result, a_file)
