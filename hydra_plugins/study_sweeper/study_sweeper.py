"""Hydra's basic sweeper, made safe for a study that takes hours of GPU time.

Before anything is written or launched, every job's config is composed and checked
(``check_job``: values in range, data present, a job folder never reused for another config)
and its folder named; two jobs that would share a folder stop the sweep. A sweep folder is
locked while its sweep runs, so a second sweep started into it is refused instead of
training every job twice.

A setting of a swept group's options applies to the options that have it:
``loss=bce,tversky loss.alpha=0.25,0.75`` runs bce once and Tversky with each alpha.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from prostate_seg.cli import exit_on_user_error
from prostate_seg.errors import ConfigError, UserError
from prostate_seg.study.runs import RunLock
from prostate_seg.study.sweeps import job_name, parse_overrides, task_overrides

log = logging.getLogger(__name__)
AUTO_SUBDIR = "${ps.job_name:}"  # the default subdir (conf/hydra/default.yaml)


@dataclass
class StudySweeperConf:
    _target_: str = "hydra_plugins.study_sweeper.study_sweeper.StudySweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    # called as check_job(job_config, job_dir) for every job before the first one starts
    # (a default here, not in conf/hydra/default.yaml, where other sweepers would receive it)
    check_job: Optional[str] = "prostate_seg.training.fit.check_job"


ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConf,
                             provider="prostate_seg")


class StudySweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None,
                 params: Optional[Dict[str, str]] = None, check_job: Optional[str] = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.check_job = get_method(check_job) if check_job else None
        self._lock: Optional[RunLock] = None

    def sweep(self, arguments: List[str]) -> Any:
        try:
            return super().sweep(arguments)
        finally:
            if self._lock is not None:
                self._lock.release()

    def split_arguments(self, overrides: List[Any],  # type: ignore[override]
                        max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """The jobs of the grid, each checked and named, before the sweep folder is made."""
        assert self.config is not None and self.hydra_context is not None
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        with exit_on_user_error():
            jobs = applicable_jobs(self.config, self.hydra_context, jobs)
            extra = check_and_name_jobs(self.config, self.hydra_context, self.check_job, jobs)
            self._lock = RunLock(Path(self.config.hydra.sweep.dir), what="sweep folder")
            self._lock.acquire()
        jobs = [job + extra[tuple(job)] for job in jobs]
        size = max_batch_size if max_batch_size and max_batch_size > 0 else max(len(jobs), 1)
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Every job was composed and checked in ``split_arguments`` already."""


_ABSENT = object()


def applicable_jobs(config: DictConfig, hydra_context: Any, jobs: List[List[str]]
                    ) -> List[List[str]]:
    """The jobs with each setting of a swept group (``loss.alpha`` while ``loss`` takes several
    options) kept only where the chosen option has that setting; jobs that then coincide (bce
    with each alpha) run once. A setting no option has stays, so a typo is still an error."""
    options: Dict[str, set] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            if "." not in key and not key.startswith(("+", "~")):
                options.setdefault(key, set()).add(value)
    swept = {group for group, values in options.items() if len(values) > 1}
    kept: Dict[Tuple[str, ...], None] = {}
    for job in jobs:
        dependent = [o for o in job if "." in o.split("=", 1)[0]
                     and o.split("=", 1)[0].split(".", 1)[0] in swept]
        if dependent:
            base = hydra_context.config_loader.load_sweep_config(
                config, [o for o in job if o not in dependent])
            job = [o for o in job if o not in dependent or OmegaConf.select(
                base, o.split("=", 1)[0], default=_ABSENT) is not _ABSENT]
        kept.setdefault(tuple(job))
    return [list(job) for job in kept]


def check_and_name_jobs(config: DictConfig, hydra_context: Any, check_job: Optional[Any],
                        jobs: List[List[str]]) -> Dict[Tuple[str, ...], List[str]]:
    """Per job of ``jobs`` (override lists), the overrides to add (its folder name, when the
    sweep's subdir is the default); raises on the first bad job."""
    values: Dict[str, set] = {}
    for job in jobs:
        for key, value in parse_overrides(job):
            values.setdefault(key, set()).add(str(value))
    swept = {key for key, seen in values.items() if len(seen) > 1}
    auto = OmegaConf.to_container(config.hydra.sweep)["subdir"] == AUTO_SUBDIR
    extra: Dict[Tuple[str, ...], List[str]] = {}
    folders: Dict[Path, int] = {}
    parent = HydraConfig.instance().cfg
    try:
        for index, job in enumerate(jobs):
            job_config = hydra_context.config_loader.load_sweep_config(config, job)
            HydraConfig.instance().set_config(job_config)  # for ${hydra:...} in the names
            added = []
            subdir = job_config.hydra.sweep.subdir
            if auto:
                subdir = job_name(job_config, [(key, value) for key, value
                                               in task_overrides(job_config) if key in swept])
                added = [f"hydra.sweep.subdir={subdir}"]
            folder = Path(job_config.hydra.sweep.dir) / str(subdir)
            if folder in folders:
                raise ConfigError(
                    f"jobs {folders[folder]} and {index} would share the folder {folder} "
                    f"({' '.join(jobs[folders[folder]])} / {' '.join(job)}); name the "
                    "setting that tells them apart in hydra.sweep.subdir")
            folders[folder] = index
            if check_job is not None:
                named = [o for o in job if o.split("=", 1)[0] in swept] or job
                try:
                    check_job(job_config, folder)
                except UserError as exc:
                    raise type(exc)(f"job {' '.join(named)}: {exc}") from None
            extra[tuple(job)] = added
    finally:
        HydraConfig.instance().cfg = parent
    log.info(f"Checked {len(jobs)} jobs before launch")
    return extra
