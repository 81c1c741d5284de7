"""Hydra's basic sweeper, made safe for a study of hours of GPU time (see docs/SWEEPS.md).

Every job is composed once, checked and named before any starts; its launcher gets that config.
"""

import copy
import logging
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Hydra's own sweeper, whose expansion of a command line's sweep this one keeps (no public
# base does it); the reason for pyproject's hydra-core<1.4
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError

from prostate_seg.command_line import check_composed, key_in_other_options, unknown_key_line
from prostate_seg.errors import ConfigError, JobFailed, UserError
from prostate_seg.settings import OUTPUTS
from prostate_seg.runs import RunLock
from prostate_seg.jobs import JOB_ENV, job_name, task_overrides

log = logging.getLogger(__name__)
AUTO_SUBDIR = "${ps.job_name:}"  # the default subdir (conf/hydra/default.yaml)


@dataclass
class StudySweeperConf:
    _target_: str = "hydra_plugins.study_sweeper.study_sweeper.StudySweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    # check_job(job_config, job_dir), for every job before the first starts (a default here,
    # not in conf/hydra/default.yaml, where other sweepers would receive it)
    check_job: Optional[str] = "prostate_seg.training.fit.check_job"
    # whose config the jobs are: what command_line.check_composed asks of them
    command: str = "train"
    # check and list the jobs, launch none and write nothing (a study's 120 before sbatch)
    dry_run: bool = False


ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConf,
                             provider="prostate_seg")


class ComposedJobs:
    """Hydra's config loader, answering a job the sweeper composed and checked with a copy of
    that config: the launcher (here or in a child) runs what was checked, composed once."""

    def __init__(self, loader: ConfigLoader) -> None:
        self.loader = loader
        self.jobs: Dict[Tuple[str, ...], DictConfig] = {}

    def __getattr__(self, name: str) -> Any:  # everything else is the loader's own work
        return getattr(vars(self).get("loader"), name)

    def __getstate__(self) -> Dict[str, Any]:
        # A SLURM launcher pickles the loader with every task: not every job's config with it.
        return {"loader": self.loader, "jobs": {}}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]
                          ) -> DictConfig:
        composed = self.jobs.get(tuple(sweep_overrides))
        if composed is None:
            return self.loader.load_sweep_config(master_config, sweep_overrides)
        return copy.deepcopy(composed)


class _Outcomes:
    """The sweep's launcher, keeping every failed job's error for the sweep's one line where
    Hydra would stop at the first."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher
        self.failed: List[BaseException] = []
        self.launched = 0  # jobs whose launch returned

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        self.launched += len(returns)
        for ret in returns:
            if ret.status == JobStatus.FAILED:
                self.failed.append(ret._return_value)  # return_value would raise it
                ret.status, ret.return_value = JobStatus.COMPLETED, None
        return returns


class _Snapshot:
    """A sweep folder's entries and multirun.yaml before a sweep, to put back when the sweep is
    refused before any job (sbatch's refusal): Hydra has rewritten the record and submitit left
    its pickles by then. A folder a job has begun in (a new one not hidden) is left alone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
        self.paths = set(folder.rglob("*")) if folder.is_dir() else set()
        record = folder / "multirun.yaml"
        self.record = (record.read_bytes(), record.stat()) if record.is_file() else None

    def restore(self) -> None:
        new = set(self.folder.rglob("*")) - self.paths if self.folder.is_dir() else set()
        if any(p.is_dir() and p.parent == self.folder and not p.name.startswith(".")
               for p in new):
            return  # a job's folder: its log says what happened
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
            with suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        record = self.folder / "multirun.yaml"
        if self.record is not None:
            record.write_bytes(self.record[0])
            os.utime(record, ns=(self.record[1].st_atime_ns, self.record[1].st_mtime_ns))
        for folder in self.made:
            with suppress(OSError):  # another process's folder in it: kept
                folder.rmdir()


class StudySweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None,
                 params: Optional[Dict[str, str]] = None, check_job: Optional[str] = None,
                 command: str = "train", dry_run: bool = False):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.check_job = check_job  # imported when the jobs are checked (torch, for training)
        self.command = command
        self.dry_run = dry_run
        self.composed: Optional[ComposedJobs] = None
        self._lock: Optional[RunLock] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.composed = ComposedJobs(hydra_context.config_loader)
        super().setup(hydra_context=HydraContext(config_loader=self.composed,
                                                 callbacks=hydra_context.callbacks),
                      task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        """Every job runs whatever another's fate; the failures end the sweep in one line. A
        sweep refused before any job ran (a launcher that cannot start, sbatch's refusal)
        leaves its folder as it found it, or absent."""
        assert self.launcher is not None and self.config is not None
        self.launcher = _Outcomes(self.launcher)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        before = _Snapshot(sweep_dir)
        try:
            returns = super().sweep(arguments)
        except UserError:
            if self._lock is not None and not self.launcher.launched:  # locked, none launched
                before.restore()
            raise
        finally:
            self._release()
        failed = self.launcher.failed
        if failed:
            total = sum(len(batch) for batch in returns)
            raise JobFailed(f"{len(failed)} of {total} jobs failed (each named above with its "
                            f"log); the first: {str(failed[0]).strip().splitlines()[-1]}")
        return returns

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def split_arguments(self, overrides: List[Any],  # type: ignore[override]
                        max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """The jobs of the grid, each checked and named, before the sweep folder is made."""
        assert self.config is not None and self.composed is not None
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        jobs = applicable_jobs(self.config, self.composed, jobs)
        jobs = check_and_name_jobs(self.config, self.composed, self.check_job, jobs,
                                   self.command)
        if self.dry_run:
            swept = {key for key in _swept(jobs) if "hydra." not in key}
            for index, job in enumerate(jobs):
                subdir = next((o.partition("=")[2] for o in job
                               if o.startswith("hydra.sweep.subdir=")), "")
                log.info(f"job {index + 1}/{len(jobs)}: {subdir} "
                         f"({' '.join(o for o in job if _key(o) in swept)})")
            log.info(f"dry run: {len(jobs)} job{'s' * (len(jobs) != 1)} checked; none "
                     f"launched, nothing written "
                     f"(the sweep folder would be {self.config.hydra.sweep.dir})")
            raise SystemExit(0)
        lock = RunLock(Path(self.config.hydra.sweep.dir), what="sweep folder")
        lock.acquire()
        self._lock = lock  # only once held: a sweep refused the lock owns nothing there
        size = max_batch_size if max_batch_size and max_batch_size > 0 else max(len(jobs), 1)
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Every job was composed and checked in ``split_arguments`` already."""


_ABSENT = object()


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def _swept(jobs: List[List[str]]) -> set:
    """The keys that take more than one value over the jobs."""
    values: Dict[str, set] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}


def applicable_jobs(config: DictConfig, loader: ConfigLoader, jobs: List[List[str]]
                    ) -> List[List[str]]:
    """A swept group's setting (``loss.alpha`` over ``loss=bce,tversky``) kept only in the jobs
    whose option has it; jobs that then coincide run once; a setting no option has is a typo."""
    swept = _swept(jobs)
    groups = {key for key in swept if "." not in key and not key.startswith(("+", "~"))}
    dependent = {_key(o) for job in jobs for o in job
                 if "." in _key(o) and _key(o).split(".", 1)[0] in groups}
    if not dependent:
        return jobs
    parents = {key.split(".", 1)[0] for key in dependent}
    options: Dict[Tuple[str, ...], DictConfig] = {}

    def has(job: List[str], key: str) -> bool:  # one config per combination of swept options
        chosen = tuple(o for o in job if _key(o) not in dependent
                       and (_key(o) not in swept or _key(o) in parents))
        if chosen not in options:
            options[chosen] = loader.load_sweep_config(config, list(chosen))
        return OmegaConf.select(options[chosen], key, default=_ABSENT) is not _ABSENT

    somewhere = {_key(o) for job in jobs for o in job if _key(o) in dependent and has(job, _key(o))}
    if dependent - somewhere:
        key = min(dependent - somewhere)
        raise ConfigError(_in_other_options(config, loader, key, jobs)
                          or unknown_key_line(key, list(options.values())))
    kept: Dict[Tuple[str, ...], None] = {}
    for job in jobs:
        kept.setdefault(tuple(o for o in job if _key(o) not in dependent or has(job, _key(o))))
    return [list(job) for job in kept]


def _in_other_options(config: DictConfig, loader: ConfigLoader, key: str,
                      jobs: List[List[str]]) -> Optional[str]:
    """key_in_other_options for the group options a sweep chose."""
    group = key.split(".", 1)[0]
    swept = sorted({o.partition("=")[2] for job in jobs for o in job if _key(o) == group})
    return key_in_other_options(key, swept, set(loader.get_group_options(group)) - set(swept),
                                lambda choice: loader.load_sweep_config(config, [choice]))


def check_and_name_jobs(config: DictConfig, loader: ComposedJobs, check_job: Optional[str],
                        jobs: List[List[str]], command: str = "train") -> List[List[str]]:
    """The jobs, each named (default subdir) and numbered, composed once into ``loader``, then
    checked as ``command`` checks its config and by ``check_job`` (imported after all
    composed: a typo is found before its imports)."""
    swept = {key.lstrip("+") for key in _swept(jobs)}  # +key=a,b: task_overrides says key
    auto = OmegaConf.to_container(config.hydra.sweep)["subdir"] == AUTO_SUBDIR
    named: List[Tuple[List[str], List[str], Path]] = []
    folders: Dict[Path, int] = {}
    outputs: Dict[Path, int] = {}
    parent = HydraConfig.instance().cfg
    try:
        for index, job in enumerate(jobs):
            job_config = loader.load_sweep_config(config, job)
            _set_hydra_config(job_config)  # for ${hydra:...} in the names
            try:
                with read_write(job_config.hydra):  # the launcher's number: a tool's subdir
                    job_config.hydra.job.num = index
                    subdir, added = job_config.hydra.sweep.subdir, []
                    job_config.hydra.job.num = MISSING  # the launcher sets it
                if auto:
                    subdir = job_name(job_config, [(key, value) for key, value
                                                   in task_overrides(job_config) if key in swept])
            except InterpolationResolutionError as exc:  # ${oc.env:UNSET}, a cycle in a name
                raise ConfigError(f"job {' '.join(job)}: {exc.full_key}: "
                                  f"{str(exc).splitlines()[0]}") from None
            if auto:
                added = [f"hydra.sweep.subdir={subdir}"]
                with read_write(job_config.hydra):  # as if composed with that override
                    job_config.hydra.sweep.subdir = subdir
                    job_config.hydra.overrides.hydra.extend(added)
            place = f"{index + 1}/{len(jobs)}"  # job k/N, in the job's environment
            added.append(f"++hydra.job.env_set.{JOB_ENV}={place}")
            with read_write(job_config.hydra), open_dict(job_config.hydra.job.env_set):
                job_config.hydra.job.env_set[JOB_ENV] = place
                job_config.hydra.overrides.hydra.append(added[-1])
            folder = Path(job_config.hydra.sweep.dir) / str(subdir)
            if folder in folders:
                raise ConfigError(
                    f"jobs {folders[folder]} and {index} would share the folder {folder} "
                    f"({' '.join(jobs[folders[folder]])} / {' '.join(job)}); name the "
                    "setting that tells them apart in hydra.sweep.subdir")
            folders[folder] = index
            loader.jobs[tuple(job + added)] = job_config
            named.append((job, added, folder))
        check = get_method(check_job) if check_job else None
        for index, (job, added, folder) in enumerate(named):
            job_config = loader.jobs[tuple(job + added)]
            _set_hydra_config(job_config)
            try:
                task = OmegaConf.masked_copy(job_config, [k for k in job_config if k != "hydra"])
                check_composed(task, job_config.hydra, command, loader)
                if check:
                    check(job_config, folder)
            except UserError as exc:
                varying = [o for o in job if _key(o).lstrip("+") in swept] or job
                raise type(exc)(f"job {' '.join(varying)}: {exc}") from None
            _claim_output(job_config, command, index, jobs, outputs)
    finally:
        HydraConfig.instance().cfg = parent
    log.info(f"Checked {len(jobs)} job{'s' * (len(jobs) != 1)} before launch")
    return [job + added for job, added, _ in named]


def _claim_output(job_config: DictConfig, command: str, index: int, jobs: List[List[str]],
                  outputs: Dict[Path, int]) -> None:
    """A tool's jobs each write their own output: the second onto the first's would stop the
    sweep halfway (or replace it, with overwrite=true)."""
    from prostate_seg.data.volume import is_nifti  # numpy: not for --help and mistakes

    key = OUTPUTS.get(command)
    if key is None:
        return
    with read_write(job_config.hydra):  # numbered as the launcher will: ${hydra:job.num}
        job_config.hydra.job.num = index
    _set_hydra_config(job_config)
    value = OmegaConf.select(job_config, key, default=None)
    with read_write(job_config.hydra):
        job_config.hydra.job.num = MISSING  # the launcher sets it
    if value is None and command == "evaluate":  # the name it derives, made the same way
        from prostate_seg.inference.evaluate import default_output

        value = str(default_output(job_config.ckpt_path, job_config.subset,
                                   job_config.largest_component, job_config.tta))
    if not isinstance(value, str) or (command == "predict" and not is_nifti(Path(value))):
        return  # a name derived, a bad value (named by the job's check), a folder of masks
    output = Path(value).resolve()
    if output in outputs:
        first = outputs[output]
        differs = next((_key(o).lstrip("+") for o in jobs[index] if o not in jobs[first]), None)
        hint = (f"name what tells them apart in it: '{key}={value}_${{{differs}}}'" if differs
                else "the two jobs are the same")
        raise ConfigError(f"jobs {first} and {index} would write the same {key}={value} "
                          f"({' '.join(jobs[first])} / {' '.join(jobs[index])}); {hint}")
    outputs[output] = index


def _set_hydra_config(job_config: DictConfig) -> None:
    """HydraConfig's ``set_config`` makes ``hydra`` read-only; a launcher sets the job's number."""
    read_only = OmegaConf.is_readonly(job_config.hydra)
    HydraConfig.instance().set_config(job_config)
    OmegaConf.set_readonly(job_config.hydra, read_only)
