"""Lightning callbacks: progress bar, epoch line, contour grids, NaN guard, interrupt checkpoint."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, OnExceptionCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from prostate_seg.errors import NonFiniteLossError

log = logging.getLogger(__name__)
# The contours' colours (RGB in [0, 1]), drawn by ``overlay`` and named by ``legend``.
CONTOURS = {"truth": (0.0, 1.0, 0.0), "prediction": (1.0, 0.0, 0.0), "both": (1.0, 1.0, 0.0)}


def contour(mask: Tensor) -> Tensor:
    """One-pixel inner boundary of a {0,1} mask batch (N, 1, H, W)."""
    return (mask + F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)).clamp(0, 1)


def overlay(image: Tensor, truth: Tensor, pred: Tensor) -> Tensor:
    """RGB (N, 3, H, W): the image in grey, the contours in the ``CONTOURS`` colours."""
    grey = image[:, :1].float()
    low, high = grey.amin((2, 3), keepdim=True), grey.amax((2, 3), keepdim=True)
    rgb = ((grey - low) / (high - low + 1e-6)).repeat(1, 3, 1, 1)
    truth_edge, pred_edge = contour(truth.float()) > 0, contour(pred.float()) > 0
    for where, name in ((truth_edge & ~pred_edge, "truth"), (pred_edge & ~truth_edge, "prediction"),
                        (truth_edge & pred_edge, "both")):
        rgb = torch.where(where, rgb.new_tensor(CONTOURS[name]).view(1, 3, 1, 1), rgb)
    return rgb


def legend(width: int, height: int = 32) -> Tensor:
    """A (3, height, width) strip naming the contour colours (TensorBoard shows no caption)."""
    strip = np.zeros((height, width, 3), np.uint8)
    font, scale, x, y = cv2.FONT_HERSHEY_SIMPLEX, 0.6, 10, height // 2
    for name, colour in CONTOURS.items():
        cv2.line(strip, (x, y), (x + 24, y), tuple(int(255 * c) for c in colour), 3)
        cv2.putText(strip, name, (x + 32, y + 6), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
        x += 32 + cv2.getTextSize(name, font, scale, 1)[0][0] + 24
    return torch.from_numpy(strip).permute(2, 0, 1).float() / 255


def _loss(outputs: Any) -> Tensor | None:
    return outputs["loss"] if isinstance(outputs, dict) else outputs


class LossProgressBar(TQDMProgressBar):
    """The tqdm bar with the loss, read from the device only when the bar refreshes (a metric
    logged with ``prog_bar=True`` makes the CPU wait for the GPU every step)."""

    _loss: Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _loss(outputs)
        self._loss = loss.detach() if isinstance(loss, Tensor) else None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._loss is not None:
            metrics["loss"] = f"{self._loss.item():.3g}"
        return metrics


class EpochLog(Callback):
    """One line per epoch (``epoch 3/100: train/loss 0.4123, ..., lr 0.0001, 12.3 s``): what a
    log file shows, where a progress bar would leave frames."""

    KEYS = ("train/loss", "select/loss", "select/dice")
    _started = 0.0  # set when each epoch starts

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics  # on every process: it syncs the epoch's metrics
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        parts = [f"{key} {float(metrics[key]):.4f}" for key in self.KEYS if key in metrics]
        parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.4g}")
        parts.append(f"{time.monotonic() - self._started:.1f} s")
        total = f"/{trainer.max_epochs}" if (trainer.max_epochs or -1) > 0 else ""
        log.info("epoch %d%s: %s", trainer.current_epoch, total, ", ".join(parts))


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time
    except (OSError, ValueError, IndexError):
        return None


class FirstStepTimer(Callback):
    """Seconds from the job's start to its first step's end: what a job costs before it trains.
    ``job_started`` (``time.monotonic()``) for a later job of a process that runs several."""

    def __init__(self, job_started: float | None = None) -> None:
        self.job_started = job_started
        self.seconds: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.seconds is None:
            self.seconds = (process_age() if self.job_started is None
                            else time.monotonic() - self.job_started)


def checkpoint_epoch(path: str | Path) -> int:
    """The epoch a checkpoint was saved at (mmap: only that number is read)."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"])


def tile(images: Tensor, per_row: int, min_size: int, gap: int = 2) -> Tensor:
    """(N, C, H, W) images as one (C, H', W') picture, ``per_row`` to a row, each enlarged by
    whole pixels (nearest) to at least ``min_size`` rows so that one-pixel contours stay sharp."""
    factor = max(1, math.ceil(min_size / images.shape[-2]))
    padded = F.pad(F.interpolate(images, scale_factor=factor, mode="nearest"), (0, gap, 0, gap))
    missing = -len(padded) % per_row
    padded = torch.cat([padded, padded.new_zeros((missing, *padded.shape[1:]))])
    rows = [torch.cat(list(padded[i:i + per_row]), dim=2) for i in range(0, len(padded), per_row)]
    return torch.cat(rows, dim=1)[:, :-gap, :-gap]


class ValidationImageGrid(Callback):
    """Contours on fixed selection slices with gland (truth green, prediction red), logged as
    ``select/predictions`` after the first and last epochs and ``select/predictions_best`` when
    the best checkpoint is validated: where the model started, stopped, and what the run keeps."""

    def __init__(self, num_images: int = 8, min_size: int = 256, per_row: int = 4):
        self.num_images, self.min_size, self.per_row = num_images, min_size, per_row
        self._indices: list[int] | None = None
        self._logged_epoch: int | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING and trainer.current_epoch == 0:
            self._log(trainer, pl_module, "select/predictions", 0)
        elif trainer.state.fn == TrainerFn.VALIDATING and trainer.ckpt_path:
            self._log(trainer, pl_module, "select/predictions_best",
                      checkpoint_epoch(trainer.ckpt_path))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = trainer.current_epoch - 1  # the epoch counter has moved past the last one
        if last >= 0 and last != self._logged_epoch:
            self._log(trainer, pl_module, "select/predictions", last)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str,
             step: int) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        dataset = trainer.datamodule.select_set
        if self._indices is None:
            with_gland = [i for i in range(len(dataset)) if dataset.gland_pixels(i) > 0]
            candidates = with_gland or list(range(len(dataset)))
            self._indices = candidates[::max(1, len(candidates) // self.num_images)]
            self._indices = self._indices[:self.num_images]
        samples = [dataset[i] for i in self._indices]
        image = torch.stack([s["image"] for s in samples]).to(pl_module.device)
        truth = torch.stack([s["mask"] for s in samples]).to(pl_module.device)
        training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            pred = (pl_module(image) > 0).float()
        pl_module.train(training)
        grid = tile(overlay(image, truth, pred).cpu(), self.per_row, self.min_size)
        grid = torch.cat([grid, legend(grid.shape[-1])], dim=1)
        if tag == "select/predictions":
            self._logged_epoch = step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, step)
                logger.experiment.flush()
            elif hasattr(logger, "log_image"):  # MLflow (prostate_seg.training.tracking)
                logger.log_image(tag, [grid], step)


class FiniteLossGuard(Callback):
    """Stop with one line when the training loss becomes NaN or infinite, before any checkpoint
    of a bad step; the flag stays on the device and is read every ``check_every_n_steps``."""

    def __init__(self, check_every_n_steps: int = 50):
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _loss(outputs)
        if loss is None:
            return
        step = trainer.global_step
        code = trainer.current_epoch * 1_000_000_000 + step  # epoch and step in one number
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        # A Python scalar, not a new tensor: no host-to-device copy, no sync in the step.
        self._first_bad = torch.where(bad & (self._first_bad < 0), code, self._first_bad)
        if step % self.check_every_n_steps == 0:
            self._raise_if_bad(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_bad(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_bad(trainer)

    def first_nonfinite(self) -> tuple[int, int] | None:
        """(epoch, global step) of the first NaN/inf loss so far, or None."""
        code = -1 if self._first_bad is None else int(self._first_bad.item())
        return divmod(code, 1_000_000_000) if code >= 0 else None

    def _raise_if_bad(self, trainer: pl.Trainer) -> None:
        # Decided by all DDP processes: the others would wait forever in the next all-reduce.
        bad = self.first_nonfinite()
        if not trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            return
        where = f"epoch {bad[0]}, global step {bad[1]}" if bad else "a step of another process"
        raise NonFiniteLossError(
            f"training loss became NaN/inf at {where}; stopped without saving "
            "(checkpoints/last.ckpt is the last good state); try a lower optimizer.lr or "
            "precision=32-true")


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Lightning's OnExceptionCheckpoint on SIGTERM or Ctrl-C during fit only (not on errors,
    nor after a NaN loss): ``last.ckpt`` to resume from, kept at teardown."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        guards = [c for c in trainer.callbacks if isinstance(c, FiniteLossGuard)]
        if any(guard.first_nonfinite() is not None for guard in guards):
            log.warning("interrupted after a NaN/inf loss: no checkpoint saved (%s, if there, is "
                        "the last good state)", self.ckpt_path)
            return
        if trainer.validating:  # resumed from here, Lightning would skip this validation and
            # early stopping would find no metric
            log.warning("interrupted during validation: no checkpoint saved (%s of the previous "
                        "epoch is where the run continues)", self.ckpt_path)
            return
        super().on_exception(trainer, pl_module, exception)
        log.warning("interrupted (%s): saved %s at epoch %d, step %d",
                    type(exception).__name__, self.ckpt_path, trainer.current_epoch,
                    trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Keep the file: it is the run's resume point, not a leftover of an exception."""


def without_bar(callbacks: list[pl.Callback]) -> list[pl.Callback]:
    """The callbacks less the progress bar, for a Trainer that shows none
    (``trainer.enable_progress_bar=false``, which Lightning refuses beside a bar, or a log file)."""
    return [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
