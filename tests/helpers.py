"""Helpers shared by the tests: paths, the tiny training setup, config composition, CLI runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from prostate_seg.config import compose_config

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("PROSTATE_SEG_DATA",
                                REPO.parent / "shared" / "data" / "prostate_t2"))
# Small and fast: a 2-level U-Net on 48x48 slices of 8 phantoms.
TINY = ["model=unet_small", "model.net.features=[8,16]", "trainer=cpu", "data.image_size=48",
        "data.batch_size=8", "data.num_workers=0", "optimizer.lr=3e-3",
        "callbacks.progress_bar.refresh_rate=0"]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The composed train config, as Hydra would give it to a run writing to ``output_dir``."""
    return compose_config("train", overrides, output_dir)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project command line (``train.py ...``, ``-m prostate_seg prepare ...``)."""
    full_env = {**os.environ, "PROSTATE_SEG_LOG_ROOT": str(cwd / "outputs"), **(env or {})}
    if args and args[0].endswith(".py"):
        args = (str(REPO / args[0]), *args[1:])
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


class FixedSizeNet(torch.nn.Module):
    """A network of one input size (as a learned position embedding makes UNETR): it fails on
    any other, as a check at the smallest size would find."""

    def __init__(self, img_size: int, in_channels: int = 1, out_channels: int = 1,
                 features: list[int] | None = None, norm: str = "batch"):
        super().__init__()
        self.size = img_size
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        if x.shape[-1] != self.size:
            raise ValueError(f"input must be {self.size} px, got {x.shape[-1]}")
        return self.conv(x)


class NoteCallback(pl.Callback):
    """A user's callback taking anything (``typing.Any``, which isinstance refuses)."""

    def __init__(self, note: Any = None):
        super().__init__()
        self.note = note


class NaNAfterLoss(torch.nn.Module):
    """BCE that turns NaN after ``steps`` training calls: a divergence on demand."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.calls = steps, 0
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, logits, target):
        if logits.requires_grad:
            self.calls += 1
        loss = self.bce(logits, target)
        return loss * float("nan") if self.calls > self.steps else loss


class DrawingBCE(torch.nn.BCEWithLogitsLoss):
    """BCE that draws from the global random stream when built and at every call, as a
    stochastic loss would."""

    def __init__(self):
        super().__init__()
        torch.rand(1)

    def forward(self, logits, target):
        torch.rand(1)
        return super().forward(logits, target)


class Pace(pl.Callback):
    """Each training batch takes at least ``seconds``: a run that lasts as long as a test needs
    (for instance to be inside a SLURM time-limit check, every 30 s) on any machine."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class SignalAt(pl.Callback):
    """Sends ``signum`` to its own process as training batch ``batch`` of epoch ``epoch``
    starts: an interruption at a chosen step, the same on every machine. Once per working
    directory (it leaves ``signal.sent``), so the run can be restarted with the same config."""

    def __init__(self, signum: int, epoch: int, batch: int):
        self.signum, self.epoch, self.batch = signum, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sent = Path("signal.sent")
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch) and not sent.exists():
            sent.touch()
            os.kill(os.getpid(), self.signum)
