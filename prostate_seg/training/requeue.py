"""SLURM's time-limit signal in a submitit job, held back until the run has saved last.ckpt:
submitit would requeue mid-step, and the requeued job repeat the epoch (docs/SWEEPS.md)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)


class Requeued(SystemExit):
    """The job was requeued after saving last.ckpt; this process ends here."""


class DeferredRequeue(Callback):
    """Holds submitit's requeue signal (SIGUSR2) until the fit has stopped and saved."""

    def __init__(self, signum: int, submitit_handler: Callable[[int, FrameType | None], Any]):
        self.signum = signum
        self._submitit_handler = submitit_handler
        self.signalled = False

    @classmethod
    def take_over(cls) -> DeferredRequeue | None:
        """In a submitit job, take note of its requeue signal instead; None elsewhere."""
        # Never imported here: importing submitit closes every logging handler (train.log).
        job_environment = sys.modules.get("submitit.core.job_environment")
        if job_environment is None:
            return None
        env = job_environment.JobEnvironment  # USR_SIG: SUBMITIT_PREEMPT_SIGNAL, USR2 by default
        signum = getattr(signal, "SIG" + env.USR_SIG)
        handler = signal.getsignal(signum)
        if not isinstance(getattr(handler, "__self__", None), job_environment.SignalHandler):
            return None
        deferred = cls(signum, handler)
        signal.signal(signum, deferred._note)
        return deferred

    def release(self) -> None:
        """Give the signal back to submitit (the run is over)."""
        signal.signal(self.signum, self._submitit_handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.signalled:
            log.warning("%s: SLURM's time limit is near; stopping at the next batch to save "
                        "last.ckpt, then requeueing", signal.Signals(signum).name)
        self.signalled = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # Lightning stops after this batch, as on preemption (its handler exists only during a
        # stage). Not at an epoch's last: it would stop in validation, where none is saved.
        last = batch_idx + 1 >= trainer.num_training_batches
        if self.signalled and not trainer.received_sigterm and not last:
            os.kill(os.getpid(), signal.SIGTERM)

    def hand_over(self) -> None:
        """After the fit stopped on the signal: submitit requeues (:class:`Requeued`) or, after
        ``max_num_timeout`` requeues, raises its ``UncompletedJobError``."""
        if not self.signalled:
            return
        try:
            self._submitit_handler(self.signum, None)
        except SystemExit as exited:
            raise Requeued("stopped before SLURM's time limit with last.ckpt saved; the job "
                           "is requeued and resumes from it") from exited
