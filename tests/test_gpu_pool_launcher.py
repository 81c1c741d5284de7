"""The gpu_pool launcher, driven end to end through a tiny Hydra app on CPU slots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_plugins.gpu_pool_launcher.gpu_pool_launcher import (
    GpuPoolLauncher,
    config_flags,
    forwarded_hydra_overrides,
)

REPO = Path(__file__).resolve().parents[1]

APP = '''
import json, os, time
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    start = time.time()
    time.sleep(cfg.durations.get(cfg.name, cfg.duration))
    record = {"slot": os.environ["PROSTATE_SEG_SLOT"], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "start": start, "end": time.time(), "pid": os.getpid()}
    with open(os.path.join(HydraConfig.get().runtime.output_dir, "record.json"), "w") as f:
        json.dump(record, f)
    if cfg.fail:
        raise RuntimeError(f"job {cfg.name} was told to fail")

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
name: x
'''


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "config.yaml").write_text(CONFIG)
    command = [sys.executable, "app.py", "-m", "hydra.launcher.accelerator=cpu",
               "hydra.launcher.devices=[0,1]", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)


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
    output = done.stdout + done.stderr
    assert "3 jobs: 2 completed, 1 failed" in output
    assert f"in {tmp_path / 'sweep' / '1'}: RuntimeError: job x was told to fail" in output


def test_bad_accelerator_is_reported_by_its_key(tmp_path: Path) -> None:
    done = sweep(tmp_path, "name=a,b", "hydra.launcher.accelerator=tpu")
    assert done.returncode != 0
    assert "hydra.launcher.accelerator='tpu'" in done.stderr
    assert not (tmp_path / "sweep").exists()


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="jobs_per_gpu"):
        GpuPoolLauncher(accelerator="cpu", jobs_per_gpu=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match=r"accelerator=cpu hydra.launcher.devices=\[0,1\]"):
        GpuPoolLauncher(accelerator="gpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert GpuPoolLauncher(jobs_per_gpu=2).slots == ["2", "3", "2", "3"]
    with pytest.raises(ValueError, match="GPU 0 is not visible"):
        GpuPoolLauncher(devices=[0])
    assert GpuPoolLauncher(accelerator="cpu").slots == ["0"]


def test_child_command_line_keeps_config_choice_and_hydra_settings() -> None:
    argv = ["-m", "-cn", "train", "--config-dir=extra", "loss=dice", "--config-path", "conf"]
    assert config_flags(argv) == ["-cn", "train", "--config-dir=extra", "--config-path", "conf"]
    parent = ["hydra/launcher=gpu_pool", "hydra.launcher.devices=[0,1]", "hydra.mode=MULTIRUN",
              "hydra.sweep.dir=x", "hydra.job.chdir=true", "+hydra.searchpath=[file://y]",
              "hydra.run.dir=z", "hydra.sweeper.max_batch_size=2"]
    assert forwarded_hydra_overrides(parent) == ["hydra.job.chdir=true",
                                                 "+hydra.searchpath=[file://y]"]

