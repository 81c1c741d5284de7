"""A command stopped, or unable to start its work, ends in one line: Ctrl-C, a launcher the
machine cannot use, a reader that left; a tool's sweep gives each job its own output."""

import os
import signal
import subprocess
import sys
import time

from helpers import TINY, run_cli


def test_the_command_list_is_help_not_an_error(tmp_path):
    for flag in ("--help", "-h", "help"):
        result = run_cli("-m", "prostate_seg", flag, cwd=tmp_path)
        assert result.returncode == 0 and result.stderr == ""
        assert "usage: python -m prostate_seg {train,evaluate,predict,prepare,synthetic,report}" \
            in result.stdout
    assert run_cli("-m", "prostate_seg", "--hepl", cwd=tmp_path).returncode == 2


def test_a_tools_sweep_names_each_output_and_logs_where_its_runs_do(tmp_path):
    result = run_cli("-m", "prostate_seg", "synthetic", "-m", "output_dir=s_${num_patients}",
                     "num_patients=1,2", "size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [len(list((tmp_path / f"s_{n}" / "masks").iterdir())) for n in (1, 2)] == [1, 2]
    logs = sorted(tmp_path.glob("outputs/logs/synthetic/*/*/synthetic.log"))
    assert [log.parent.name for log in logs] == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "s_1", "s_2"]
    numbered = run_cli("-m", "prostate_seg", "synthetic", "-m", "output_dir=n_${hydra:job.num}",
                       "num_patients=1,2", "size=32", cwd=tmp_path)  # the launcher's number
    assert numbered.returncode == 0 and (tmp_path / "n_1" / "masks").is_dir(), numbered.stderr


def test_help_whose_reader_left_ends_quietly(tmp_path):
    """``--help | head``: the reader may close the pipe first (``true`` reads nothing)."""
    shown = subprocess.run(f"{sys.executable} -m prostate_seg predict --help | true", shell=True,
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert shown.stderr == ""


def test_ctrl_c_ends_a_tool_in_one_line(tmp_path):
    """SIGINT to the process group, as a terminal sends it, while phantoms are written."""
    out = tmp_path / "phantoms"
    command = [sys.executable, "-m", "prostate_seg", "synthetic", f"output_dir={out}",
               "num_patients=200", "size=128"]
    tool = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={
                                **os.environ, "PROSTATE_SEG_LOG_ROOT": str(tmp_path / "logs")})
    deadline = time.monotonic() + 120
    while not list(out.glob("masks/*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(tool.pid, signal.SIGINT)
    _, stderr = tool.communicate(timeout=60)
    assert (tool.returncode, stderr) == (130, "error: interrupted\n")


def test_a_launcher_that_cannot_start_the_sweep_says_so_in_one_line(prepared, tmp_path):
    """gpu_pool with no GPU visible, and a SLURM whose sbatch refuses the array job."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: "
                                 "debug' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    path = f"{fake}{os.pathsep}{os.environ['PATH']}"
    for launcher, env, message in (
            (["hydra/launcher=gpu_pool"], {"CUDA_VISIBLE_DEVICES": ""},
             "error: hydra.launcher.accelerator=gpu"),
            (["hydra/launcher=slurm", "hydra.launcher.partition=debug"], {"PATH": path},
             "error: hydra/launcher=slurm: sbatch refused the sweep's array job: sbatch: error: "
             "invalid partition specified: debug")):
        result = run_cli("train.py", "-m", *TINY, f"data.dir={prepared}", "seed=0,1",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}", *launcher, cwd=tmp_path,
                         env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "sweep").exists()  # a refused command leaves no folder
    # into an earlier sweep's folder: its record, its runs and the report's say are as they were
    earlier = tmp_path / "sweep"
    (earlier / "bce-fold0-seed0").mkdir(parents=True)
    (earlier / "bce-fold0-seed0" / "results.json").write_text("{}")
    (earlier / "multirun.yaml").write_text("the earlier sweep's\n")
    os.utime(earlier / "multirun.yaml", ns=(1, 10 ** 18))
    before = {str(p): (p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
              for p in earlier.rglob("*")}
    result = run_cli("train.py", "-m", *TINY, f"data.dir={prepared}", "seed=0,1",
                     f"hydra.sweep.dir={earlier}", "hydra/launcher=slurm",
                     "hydra.launcher.partition=debug", cwd=tmp_path, env={"PATH": path})
    assert result.returncode == 2 and "sbatch refused" in result.stderr, result.stderr
    assert {str(p): (p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
            for p in earlier.rglob("*")} == before
