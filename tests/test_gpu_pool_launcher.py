"""The gpu_pool launcher, driven end to end through a tiny Hydra app on CPU slots."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omegaconf import OmegaConf

from hydra_plugins.gpu_pool_launcher.gpu_pool_launcher import GpuPoolLauncher
from prostate_seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

APP = '''
import json, os, signal, sys, time
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    start = time.time()
    out = HydraConfig.get().runtime.output_dir
    with open(os.path.join(out, "started.json"), "w") as f:
        json.dump({"pid": os.getpid(), "start": start}, f)
    if cfg.on_term_s:  # like train.py: SIGTERM saves a checkpoint (takes a while), then exits
        def save_and_exit(signum, frame):
            time.sleep(cfg.on_term_s)
            with open(os.path.join(out, "saved.json"), "w") as f:
                json.dump({"signal": signum}, f)
            sys.exit(128 + signum)
        signal.signal(signal.SIGTERM, save_and_exit)
    if cfg.die:  # a progress bar, then killed (out of memory, say)
        for percent in range(0, 60, 10):
            sys.stderr.write(f"\\rEpoch 0: {percent}%|###   | 3/8 [00:01<00:02]")
            sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(cfg.durations.get(cfg.name, cfg.duration))
    record = {"slot": os.environ["PROSTATE_SEG_SLOT"], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "start": start, "end": time.time(), "pid": os.getpid()}
    with open(os.path.join(HydraConfig.get().runtime.output_dir, "record.json"), "w") as f:
        json.dump(record, f)
    if cfg.fail:
        raise RuntimeError(f"job {cfg.name} was told to fail")
    if cfg.user_error:  # ended as the project's tools end a user's mistake
        from prostate_seg.cli import _run
        from prostate_seg.errors import ConfigError

        def task(cfg):
            raise ConfigError(f"name={cfg.name}: not a name this job takes")
        _run(task, cfg)

if __name__ == "__main__":
    main()
'''

# The project's conf/ is on the search path so that hydra/launcher=gpu_pool is the real yaml.
CONFIG = f'''
defaults:
  - override hydra/launcher: gpu_pool
  - _self_
hydra:
  searchpath: [file://{REPO / "conf"}]
duration: 0.1
durations: {{a: 5.0, b: 0.2, c: 0.2, d: 0.2}}
fail: false
user_error: false
name: x
on_term_s: 0
die: false
'''


def sweep_command(tmp_path: Path, *overrides: str) -> list[str]:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "config.yaml").write_text(CONFIG)
    return [sys.executable, "app.py", "-m", "hydra.launcher.accelerator=cpu",
            "hydra.launcher.devices=[0,1]", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(tmp_path, *overrides), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def job_files(tmp_path: Path, num: int) -> tuple[dict, dict | None]:
    """launcher.json and the app's record.json (None when the app wrote none) of job ``num``."""
    job_dir = tmp_path / "sweep" / str(num)
    record = job_dir / "record.json"
    return (json.loads((job_dir / "launcher.json").read_text()),
            json.loads(record.read_text()) if record.exists() else None)


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_freed_slot_takes_the_next_job_at_once(tmp_path: Path) -> None:
    done = sweep(tmp_path, "name=a,b,c,d")
    assert done.returncode == 0, done.stderr
    launched, records = zip(*(job_files(tmp_path, num) for num in range(4)))
    for num, (info, record) in enumerate(zip(launched, records)):
        assert info["status"] == "completed" and info["returncode"] == 0
        assert info["job"] == num and record is not None
        assert record["cuda"] == "" and record["slot"] == info["device"]

    by_slot: dict[str, list[dict]] = {}
    for info, record in zip(launched, records):
        by_slot.setdefault(record["slot"], []).append(info)
    assert set(by_slot) == {"0", "1"}
    for intervals in by_slot.values():  # one process at a time per slot
        assert not any(overlap(x, y) for i, x in enumerate(intervals) for y in intervals[i + 1:])

    a, b, c, d = records
    assert overlap(a, b) and a["slot"] != b["slot"]  # both slots busy at once
    # b's slot ran c and then d while the long job a was still running; a scheduler that sends
    # job i to slot i % 2 would have queued c behind a.
    assert b["slot"] == c["slot"] == d["slot"]
    assert c["start"] < a["end"] and d["start"] < a["end"]
    assert "4 jobs: 4 completed, 0 failed" in done.stdout + done.stderr


def test_failed_job_fails_the_sweep_after_the_others_ran(tmp_path: Path) -> None:
    done = sweep(tmp_path, "fail=false,true,false")
    assert done.returncode != 0
    for num in (0, 2):
        info, record = job_files(tmp_path, num)
        assert info["status"] == "completed" and record is not None
    info, _ = job_files(tmp_path, 1)
    assert info["status"] == "failed" and info["returncode"] != 0
    assert "RuntimeError: job x was told to fail" in info["error"]
    assert info["error"].splitlines()[0] == "exit code 1"  # then the log's last lines
    assert not info["error"].splitlines()[-1].startswith("exit code")  # the report reads this
    output = done.stdout + done.stderr
    assert "3 jobs: 2 completed, 1 failed" in output
    # one line: where the job's log is, and its last line
    assert any(str(tmp_path / "sweep" / "1") in line and
               line.endswith("RuntimeError: job x was told to fail") for line in output.splitlines())


def test_bad_accelerator_is_reported_by_its_key(tmp_path: Path) -> None:
    done = sweep(tmp_path, "name=a,b", "hydra.launcher.accelerator=tpu")
    assert done.returncode != 0
    assert "hydra.launcher.accelerator='tpu'" in done.stderr
    assert not (tmp_path / "sweep").exists()


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="jobs_per_gpu"):
        GpuPoolLauncher(accelerator="cpu", jobs_per_gpu=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"accelerator=cpu hydra.launcher.devices=\[0,1\]"):
        GpuPoolLauncher(accelerator="gpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert GpuPoolLauncher(jobs_per_gpu=2).slots == ["2", "3", "2", "3"]
    with pytest.raises(ConfigError, match="GPU 0 is not visible"):
        GpuPoolLauncher(devices=[0])
    assert GpuPoolLauncher(accelerator="cpu").slots == ["0"]


# Records every process that starts and every config Hydra composes in it, in the sweep's
# process and in every job's (Python imports sitecustomize from the PYTHONPATH at start-up).
COUNT_COMPOSITIONS = '''
import json, os
from hydra._internal.config_loader_impl import ConfigLoaderImpl

def record(**entry):
    with open(os.environ["COMPOSITIONS"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **entry}) + "\\n")

_load = ConfigLoaderImpl.load_configuration

def load_configuration(self, config_name, overrides, *args, **kwargs):
    record(overrides=list(overrides))
    return _load(self, config_name, overrides, *args, **kwargs)

ConfigLoaderImpl.load_configuration = load_configuration
record()
'''


def test_each_job_is_composed_once_and_its_process_runs_that_config(tmp_path):
    """The study sweeper composes and checks every job; the launcher and the job's own process
    use that config: one composition per job in all, none from the command line again."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(COUNT_COMPOSITIONS)
    counts = tmp_path / "compositions.jsonl"
    env = {**os.environ, "COMPOSITIONS": str(counts), "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(sweep_command(tmp_path, "name=a,b,c", "hydra/sweeper=study",
                                        "hydra.sweeper.check_job=null",
                                        "hydra.sweep.subdir=${ps.job_name:}"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    folders = {json.loads((p / "launcher.json").read_text())["job"]: p
               for p in (tmp_path / "sweep").iterdir() if (p / "launcher.json").exists()}
    jobs = {f"name={name}": json.loads((folders[num] / "record.json").read_text())
            for num, name in enumerate("abc")}
    lines = [json.loads(line) for line in counts.read_text().splitlines()]
    started = [line["pid"] for line in lines if "overrides" not in line]
    compositions = [line for line in lines if "overrides" in line]
    sweep_pid = started[0]
    for override, record in jobs.items():
        assert [c["pid"] for c in compositions if override in c["overrides"]] == [sweep_pid]
        assert record["pid"] in started  # counted there too,
        assert record["pid"] not in {c["pid"] for c in compositions}  # and composed nothing
    for num, folder in folders.items():  # what Hydra records of the job: the sweeper's config
        hydra_cfg = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
        assert hydra_cfg.sweep.subdir == folder.name and hydra_cfg.job.num == num
        assert OmegaConf.load(folder / ".hydra" / "overrides.yaml") == [f"name={'abc'[num]}"]


def test_a_job_runs_again_from_its_file_with_overrides_set_on_its_config(tmp_path):
    """What Lightning's DDP does to start a job's other processes: the job's command line again,
    plus overrides (here a log of another name, no second .hydra/, and a task setting)."""
    assert sweep(tmp_path).returncode == 0
    job = tmp_path / "sweep" / "0"
    (job / ".hydra" / "config.yaml").unlink()
    again = subprocess.run([*json.loads((job / "launcher.json").read_text())["command"],
                            "hydra.job.name=again", "hydra.output_subdir=null", "fail=true"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PROSTATE_SEG_SLOT": "0"})
    assert again.returncode == 1 and "RuntimeError: job x was told to fail" in again.stderr
    assert (job / "again.log").exists() and not (job / ".hydra" / "config.yaml").exists()


def test_a_user_error_in_a_job_is_its_one_line_and_exit_code_2(tmp_path):
    done = sweep(tmp_path, "user_error=false,true")
    assert done.returncode != 0
    info, _ = job_files(tmp_path, 1)
    assert info["status"] == "failed" and info["returncode"] == 2
    log = (tmp_path / "sweep" / "1" / "launcher.log").read_text()
    assert log.splitlines()[1:] == ["error: name=x: not a name this job takes"]
    assert info["error"].splitlines()[-1] == "error: name=x: not a name this job takes"


# --- interrupts and kills --------------------------------------------------------------------
def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _start_two_long_jobs(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A 3-job sweep on 2 slots whose jobs take 1.5 s to save after SIGTERM; returns once the
    first two run (the third waits for a slot)."""
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(sweep_command(tmp_path, "name=long1,long2,long3", "duration=60",
                                          "on_term_s=1.5"),
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    started = [tmp_path / "sweep" / str(n) / "started.json" for n in (0, 1)]
    _wait_for(lambda: all(p.exists() for p in started))
    time.sleep(0.5)  # the jobs install their SIGTERM handler after writing started.json
    return proc, [json.loads(p.read_text())["pid"] for p in started]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_sweep_gives_every_running_job_its_grace_period(signum, tmp_path):
    proc, pids = _start_two_long_jobs(tmp_path)
    proc.send_signal(signum)  # Ctrl-C (the jobs run in their own sessions) or a kill
    assert proc.wait(timeout=60) != 0
    for num in (0, 1):
        job = tmp_path / "sweep" / str(num)
        assert (job / "saved.json").exists(), f"job {num} was killed before it saved"
        record = json.loads((job / "launcher.json").read_text())
        assert record["status"] == "interrupted"
        assert record["error"] == "stopped by the launcher: exit code 143 (128 + SIGTERM)"
    assert not (tmp_path / "sweep" / "2" / "started.json").exists()  # the queued job never ran
    assert not any(_alive(pid) for pid in pids)


def test_jobs_die_with_a_killed_launcher(tmp_path):
    proc, pids = _start_two_long_jobs(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to stop its children itself
    proc.wait()
    try:
        _wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=30)
    finally:
        for pid in filter(_alive, pids):  # orphans of a failed test: not left running
            os.kill(pid, signal.SIGKILL)
    for num in (0, 1):  # they got SIGTERM from the kernel: time to save, as on Ctrl-C
        assert (tmp_path / "sweep" / str(num) / "saved.json").exists()


def test_a_killed_job_is_recorded_as_killed_by_its_signal(tmp_path):
    done = sweep(tmp_path, "die=false,true")
    assert done.returncode != 0
    record = json.loads((tmp_path / "sweep" / "1" / "launcher.json").read_text())
    assert record["status"] == "failed" and record["returncode"] == -signal.SIGKILL
    assert record["error"] == "killed by signal 9 (SIGKILL)"
    assert record["log_tail"][-1] == "Epoch 0: 50%|###   | 3/8 [00:01<00:02]"  # last frame only
    assert "job #1 failed (killed by signal 9 (SIGKILL))" in done.stdout + done.stderr


def test_a_rerun_appends_to_the_job_log(tmp_path):
    for _ in range(2):
        assert sweep(tmp_path, "fail=true").returncode != 0
    log = (tmp_path / "sweep" / "0" / "launcher.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("===== gpu_pool")]
    assert [h.split(", ")[1] for h in headers] == ["attempt 1", "attempt 2"]
    assert log.count("RuntimeError: job x was told to fail") == 2  # both attempts' output kept
    assert json.loads((tmp_path / "sweep" / "0" / "launcher.json").read_text())["attempt"] == 2
