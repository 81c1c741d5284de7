"""Sweep jobs: folder names (``bce-fold1-seed2-lr0.001``, characters Hydra's parser takes
unquoted, so a checkpoint path pastes into ``ckpt_path=``) and one console line per job."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
# "k/N": a job's place in its sweep, set by the study sweeper in the job's environment
# (hydra.job.env_set), so every launcher and the job itself can say it.
JOB_ENV = "PROSTATE_SEG_JOB"

DEFAULT_BASELINE = "bce"  # the loss every other is compared with, when a sweep has it
ALWAYS_NAMED = ("loss", "data.fold", "seed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")


def _token(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return _UNSAFE.sub("_", text).strip("_") or "none"


def job_name(cfg: DictConfig, varying: Iterable[tuple[str, Any]]) -> str:
    """``<loss>-fold<k>-seed<s>`` plus ``-<key><value>`` per other varying setting (none for a
    loss setting already in the loss name, like alpha in ``tversky_a0.25``)."""
    loss = _token(OmegaConf.select(cfg, "loss.name", default="loss"))
    parts = [f"{loss}-fold{OmegaConf.select(cfg, 'data.fold')}-seed{cfg.get('seed')}"]
    varying = [(k, v) for k, v in varying if k not in ALWAYS_NAMED]
    short = [k.rsplit(".", 1)[-1] for k, _ in varying]
    for (key, value), last in zip(varying, short):
        value = _token(value)
        if key.startswith("loss.") and value in loss:
            continue
        label = "" if "." not in key else (last if short.count(last) == 1 else key)
        parts.append(f"{label}{value}")
    return "-".join(parts)


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """(key, value) of overrides as Hydra parses them (``1e-3`` is 0.001), deletions left out."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [(o.key_or_group, o.value()) for o in parsed if not o.is_delete()]


def task_overrides(cfg: DictConfig) -> list[tuple[str, Any]]:
    """The job's overrides minus Hydra's ``override_dirname.exclude_keys``."""
    excluded = set(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys",
                                    default=[]) or [])
    return [(key, value) for key, value in parse_overrides(
        OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []) if key not in excluded]


def job_name_resolver(*, _root_: DictConfig) -> str:
    """``${ps.job_name:}``, the default ``hydra.sweep.subdir``; the study sweeper names by its
    swept settings only."""
    return job_name(_root_, task_overrides(_root_))


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 12 s``, ``1 h 05 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Elapsed and remaining time of a sweep: the mean job so far times the jobs left, per slot."""

    def __init__(self, total: int, slots: int = 1) -> None:
        self.started = time.monotonic()
        self.total, self.slots = total, max(1, slots)
        self.durations: list[float] = []

    def finished(self, seconds: float) -> str:
        self.durations.append(seconds)
        done, total = len(self.durations), self.total
        left = (total - done) * sum(self.durations) / done / self.slots
        return (f"elapsed {duration(time.monotonic() - self.started)}"
                + (f", about {duration(left)} left" if done < total else ""))


class SweepProgress(Callback):
    """One console line per job start and end (the gpu_pool launcher reports its own jobs)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.place, self.job_started = "", 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.progress = Progress(total=0)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.place = os.environ.get(JOB_ENV, "")  # Hydra sets it around the task only
        if self.progress is not None and self.place:
            self.progress.total = int(self.place.split("/")[1])
            self.job_started = time.monotonic()
            log.info("job %s started: %s", self.place, Path(config.hydra.runtime.output_dir).name)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        place = self.place
        if self.progress is None or not place:
            return
        took = time.monotonic() - self.job_started
        folder = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.COMPLETED:
            log.info("job %s done in %s: %s; %s", place, duration(took), folder.name,
                     self.progress.finished(took))
        else:
            # the exception itself: the public return_value raises it, after a stderr line
            error = str(job_return._return_value).strip().splitlines() or ["failed"]
            log.error("job %s FAILED after %s: %s (log: %s); %s", place, duration(took),
                      error[-1], folder / f"{config.hydra.job.name}.log",
                      self.progress.finished(took))
