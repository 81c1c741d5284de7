"""SLURM's time-limit signal in a submitit job, held back until the run has saved last.ckpt.

``hydra/launcher=slurm`` runs each sweep job through submitit, which asks SLURM to send
SIGUSR2 ``signal_delay_s`` seconds before the job's time limit (``sbatch --signal=USR2@<s>``)
and handles it by pickling the job, running ``scontrol requeue`` and exiting on the spot:
mid-step, without a checkpoint, so the requeued job repeats the epoch. :class:`DeferredRequeue`
takes that signal over for the duration of a run. The fit stops at the next batch boundary
the way Lightning stops on SIGTERM (every DDP rank at the same step), ``InterruptCheckpoint``
saves last.ckpt, and only then does submitit's handler requeue the job, which resumes from
last.ckpt (``resume=true``). After ``max_num_timeout`` requeues submitit refuses, and the run
fails for good with that reason.

Preemption and ``scontrol requeue`` need none of this: SLURM sends SIGTERM itself (and
SIGKILL ``KillWait`` seconds later) and requeues the job; submitit ignores SIGTERM, Lightning
stops at the next batch and last.ckpt is saved the same way.
"""

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
    """Holds submitit's requeue signal until the fit has stopped and saved (see module doc)."""

    def __init__(self, signum: int, submitit_handler: Callable[[int, FrameType | None], Any]):
        self.signum = signum
        self._submitit_handler = submitit_handler
        self.signalled = False

    @classmethod
    def take_over(cls) -> DeferredRequeue | None:
        """In a submitit job, replace submitit's handler of its requeue signal with one that
        only takes note; None anywhere else (no submitit handler installed)."""
        # A submitit job has imported it. Not imported here otherwise: importing submitit
        # reconfigures logging, closing every handler (train.log) of this process.
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
        # Lightning stops after this batch, as on preemption; its handler is only installed
        # while it runs a stage, so the signal is passed on here rather than from _note. Not
        # at an epoch's last batch: Lightning would stop in the validation after it, where no
        # checkpoint is taken and the epoch is lost; the next epoch's first batch stops instead.
        last = batch_idx + 1 >= trainer.num_training_batches
        if self.signalled and not trainer.received_sigterm and not last:
            os.kill(os.getpid(), signal.SIGTERM)

    def hand_over(self) -> None:
        """After the fit stopped on the time-limit signal: submitit requeues the job (raises
        :class:`Requeued`) or refuses, after ``max_num_timeout`` requeues (raises its
        ``UncompletedJobError``). Returns if the signal never came, or on a DDP rank > 0
        (rank 0 requeues the job)."""
        if not self.signalled:
            return
        try:
            self._submitit_handler(self.signum, None)
        except SystemExit as exited:
            raise Requeued("stopped before SLURM's time limit with last.ckpt saved; the job "
                           "is requeued and resumes from it") from exited
