"""The speed options change nothing but rounding; the throughput benchmark still runs."""

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import REPO, TINY, compose_train, run_cli
from omegaconf import OmegaConf

from prostate_seg.training.module import SegmentationModule
from prostate_seg.training.fit import build_run

# Each of these makes the host wait for the device (a GPU sync) when called on a CUDA tensor.
_DEVICE_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _module(prepared, tmp_path, *overrides):
    cfg = compose_train([*TINY, f"data.dir={prepared}", "model.net.features=[4,8]", *overrides],
                        tmp_path)
    return SegmentationModule(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.extra  # torch.compile's first compile takes about half a minute on the CPU
def test_fast_path_gives_the_plain_fp32_loss_within_bf16_rounding(prepared, tmp_path):
    torch.manual_seed(0)
    plain = _module(prepared, tmp_path)
    fast = _module(prepared, tmp_path, "model.compile=true", "model.channels_last=true")
    fast.net.load_state_dict(plain.net.state_dict())
    image = torch.rand(4, 1, 32, 32)
    mask = (torch.rand(4, 1, 32, 32) > 0.7).float()
    expected = plain.loss_fn(plain(image), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fast(image)
    assert logits.dtype == torch.bfloat16
    got = fast.loss_fn(logits, mask)
    assert got.item() == pytest.approx(expected.item(), rel=2e-2)
    assert torch.allclose(logits.float(), plain(image), atol=0.1)


@pytest.mark.extra
def test_throughput_benchmark_smoke_run(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_cli(str(REPO / "benchmarks" / "throughput.py"), "--smoke", "--profile", "2",
                     "--json", str(out), "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["plain_end_to_end"] > 0 and figures["framework_images_per_s"] > 0
    assert figures["speedup_vs_plain"] == pytest.approx(
        figures["framework_images_per_s"] / figures["plain_end_to_end"])
    assert figures["variants"][0]["name"].startswith("framework default")
    assert figures["profile"]["steps"] == 2 and figures["profile"]["wall_ms_per_step"] > 0
    assert "convolution" in (tmp_path / "throughput_profile.txt").read_text()


@pytest.mark.extra
def test_sweep_throughput_benchmark_smoke_run(tmp_path):
    """The jobs-per-GPU benchmark at CPU smoke size: each setting ran the whole sweep, and its
    figures come from the files the jobs wrote."""
    out = tmp_path / "sweep.json"
    result = run_cli(str(REPO / "benchmarks" / "sweep_throughput.py"), "--smoke", "--json",
                     str(out), "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["jobs_per_gpu"] for r in rows] == [1, 2] and all(r["jobs"] == 2 for r in rows)
    for row in rows:
        assert row["images_per_s"] > 0 and 0 < row["startup_s_mean"] <= row["startup_s_max"]
        assert row["startup_s_max"] < row["wall_s"]
    for j in (1, 2):
        folders = sorted(p.name for p in (tmp_path / "work" / f"sweep_j{j}").iterdir()
                         if (p / "results.json").exists())
        assert folders == ["bce-fold0-seed0", "tversky_a0.5-fold0-seed0"]
    assert "jobs/GPU" in result.stdout


@pytest.mark.extra
def test_step_time_benchmark_smoke_run():
    result = run_cli(str(REPO / "benchmarks" / "step_time.py"), "--size", "32", "--batch", "2",
                     "--warmup", "0", "--steps", "1", "--widths", "16-128", "--channels", "3",
                     "--precisions", "fp32,bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(" 16-128")]
    assert [tuple(r[1:4]) for r in rows] == [
        (norm, layout, precision) for norm in ("batch", "instance")
        for layout in ("channels_last", "NCHW") for precision in ("fp32", "bf16")]
    assert all(float(r[4]) > 0 for r in rows)


@pytest.mark.extra
def test_study_script_runs_whole_seeds_within_its_budget(prepared, tmp_path):
    """benchmarks/study.sh at CPU smoke size: seed 0's block of 8 losses runs, seed 1 would
    overrun the budget and is not started, and the report covers the seeds that ran."""
    out = tmp_path / "study=1,2'"  # Hydra's grammar in a path
    shutil.copytree(prepared, out / "prepared_48")  # reused: no preparation inside the budget
    env = {**os.environ, "PYTHON": sys.executable, "STUDY_IMAGE_SIZE": "48",
           "STUDY_SEEDS": "0 1", "STUDY_BUDGET_S": "3",
           "PROSTATE_SEG_LOG_ROOT": str(tmp_path / "outputs")}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "study.sh"), "unused", str(out),
         "hydra.launcher.accelerator=cpu", "hydra.launcher.devices=[0]",
         "hydra.launcher.jobs_per_gpu=2", "trainer=cpu", "model.net.features=[4,8]",
         "model.compile=false", "trainer.max_epochs=1", "data.batch_size=4", "data.folds=2",
         "study.folds=[0]"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in (out / "study").rglob("results.json"))
    assert len(runs) == 8 and all(name.endswith("-fold0-seed0") for name in runs)
    assert "seed 1 not started" in result.stdout
    record = json.loads((out / "study_run.json").read_text())
    assert list(record["seed_wall_s"]) == ["0"] and record["failed"] == []
    assert "4 val patients (1 fold × 1 seed)" in (out / "study/report/results.md").read_text()

    again = subprocess.run(["bash", str(REPO / "benchmarks" / "study.sh"), "unused", str(out)],
                           cwd=tmp_path, env={**env, "STUDY_BUDGET_S": "3s"},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "STUDY_BUDGET_S=3s" in again.stderr
    refused = subprocess.run(["bash", str(REPO / "benchmarks" / "study.sh"), "unused", str(out),
                              "model.net.norm=bogus"], cwd=tmp_path,
                             env={**env, "STUDY_SEEDS": "0"}, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1 and "failed: seed 0" in refused.stderr
    assert json.loads((out / "study_run.json").read_text())["failed"] == ["seed 0"]


class _DeviceReadCounter(pl.Callback):
    """Counts tensor reads back to the host made by the framework while training batches run
    (from each batch start to the next, so Lightning's own end-of-batch logging is included;
    validation and epoch ends are not). Reads inside torch itself are left out: those of the
    optimizer (the fused Adam used on the GPU makes none) and of the DataLoader (CPU tensors).
    """

    def __init__(self, monkeypatch, skip_steps: int):
        self.skip_steps, self.active, self.steps, self.reads = skip_steps, False, 0, []
        for name in _DEVICE_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, read):
        def counted(tensor, *args, **kwargs):
            if self.active:
                caller = traceback.extract_stack(limit=2)[0]
                if "torch" not in Path(caller.filename).parts:
                    self.reads.append(f"{Path(caller.filename).name}:{caller.lineno}")
            return read(tensor, *args, **kwargs)
        return counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = trainer.global_step >= self.skip_steps
        self.steps += self.active

    def on_train_epoch_end(self, trainer, pl_module):
        self.active = False

    def on_validation_start(self, trainer, pl_module):
        self.active = False


def test_training_steps_do_not_wait_for_the_device(prepared, tmp_path, monkeypatch):
    """The CPU must run ahead of the GPU: a metric logged with prog_bar=True, or a check read
    every step, would make every step wait. Allowed: the progress bar's loss when it refreshes
    (every 10 steps) and the divergence guard (every 50)."""
    cfg = compose_train([*TINY, f"data.dir={prepared}", "trainer.max_epochs=4",
                         "callbacks.early_stopping.patience=10", "evaluate_best=false",
                         "callbacks.progress_bar.refresh_rate=10",
                         "callbacks.finite_loss.check_every_n_steps=50"], tmp_path / "run")
    datamodule, module, trainer = build_run(cfg)
    counter = _DeviceReadCounter(monkeypatch, skip_steps=2)
    trainer.callbacks.insert(0, counter)  # its epoch-end hook runs first: epoch ends not counted
    trainer.fit(module, datamodule=datamodule)
    assert counter.steps >= 40
    # The bar also refreshes on the last batch of each epoch.
    allowed = counter.steps // 10 + trainer.current_epoch + counter.steps // 50 + 1
    assert len(counter.reads) <= allowed, sorted(set(counter.reads))
