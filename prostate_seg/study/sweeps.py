"""Sweep jobs: their folder names, and the console line of each job's start and end.

A job folder is named after what tells it apart: the loss, the fold, the seed, then any other
swept setting (``tversky_a0.25-fold0-seed0``, ``bce-fold1-seed2-lr0.001``). The names keep to
characters Hydra's command-line parser accepts unquoted, so a checkpoint path from a sweep can
be pasted into ``ckpt_path=...`` as it is.
"""

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
    """``<loss>-fold<k>-seed<s>`` plus one ``-<key><value>`` per other varying setting (a group
    choice such as ``model=unet_small`` adds its value; a loss setting already spelled in the
    loss name, like alpha in ``tversky_a0.25``, adds nothing)."""
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
    """(key, value) of command-line overrides as Hydra parses them (``1e-3`` is 0.001),
    deletions left out."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [(o.key_or_group, o.value()) for o in parsed if not o.is_delete()]


def task_overrides(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(key, value) of the job's command-line overrides, minus the keys Hydra is told to keep
    out of folder names (``hydra.job.config.override_dirname.exclude_keys``)."""
    excluded = set(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys",
                                    default=[]) or [])
    return [(key, value) for key, value in parse_overrides(
        OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []) if key not in excluded]


def job_name_resolver(*, _root_: DictConfig) -> str:
    """``${ps.job_name:}``, the default ``hydra.sweep.subdir``: a name from every override of the
    job. The project's sweeper, which sees the whole grid, names a job by its swept settings
    only (the same ``job_name`` of the same ``task_overrides``)."""
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
    """Elapsed time and the time left of a sweep: the mean job so far times the jobs left,
    shared by ``slots`` running at once."""

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
    """Hydra callback: one console line when each job of a sweep starts and one when it ends
    (``job 3/7``, its folder, its time, the sweep's elapsed time and time left, or why it failed
    and where its log is). Jobs run by the gpu_pool launcher report from the launcher."""

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
            error = str(job_return._return_value).strip().splitlines() or ["failed"]
            log.error("job %s FAILED after %s: %s (log: %s); %s", place, duration(took),
                      error[-1], folder / f"{config.hydra.job.name}.log",
                      self.progress.finished(took))
