"""hydra-submitit-launcher's SLURM launcher, waiting for every task: upstream stops at the first
task that ended without a result (cancelled, out of memory, node failure) while others still run.
Such a task is recorded as failed in its folder's ``launcher.json``, as gpu_pool does."""

import logging
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.core.singleton import Singleton
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from prostate_seg.errors import JobFailed, one_line
from prostate_seg.files import write_json
from prostate_seg.runs import LAUNCHER_FILE

log = logging.getLogger(__name__)

# Launcher settings that configure the executor itself rather than each job's sbatch flags.
_EXECUTOR_KEYS = ("submitit_folder", "max_num_timeout")


class SlurmSweepLauncher(SlurmLauncher):
    """``hydra/launcher=slurm``: one array task per sweep job, every task waited for."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from submitit.core.utils import FailedJobError

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_num_timeout"])
        generic = set(OmegaConf.structured(BaseQueueConf).keys())  # timeout_min, mem_gb, ...
        executor.update_parameters(**{
            key if key in generic else f"slurm_{key}": value
            for key, value in self.params.items() if key not in _EXECUTOR_KEYS})
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        indices = [initial_job_idx + i for i in range(len(job_overrides))]
        for idx, overrides in zip(indices, job_overrides):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        try:
            jobs = executor.map_array(
                self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(indices),
                indices, [f"job_id_for_{idx}" for idx in indices], [state] * len(indices))
        except FailedJobError as exc:  # submitit's words for sbatch's refusal: its stderr
            raise JobFailed(f"hydra/launcher=slurm: sbatch refused the sweep's array job: "
                            f"{one_line(exc)}") from None
        log.info(f"Submitted SLURM array job {jobs[0].job_id.split('_')[0]} "
                 f"({len(jobs)} tasks); waiting for all of them")
        for job in jobs:
            job.wait()  # every task, before looking at any result
        return [self._result(job, idx, list(overrides), sweep_dir)
                for job, idx, overrides in zip(jobs, indices, job_overrides)]

    def _result(self, job: Any, idx: int, overrides: List[str], sweep_dir: Path) -> JobReturn:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return job.results()[0]
        except UncompletedJobError as exc:
            state = job.state
            cause = ("failed outside the run" if isinstance(exc, FailedJobError) else
                     "ended without a result (cancelled, killed, out of memory, node failure?)")
            error = f"SLURM task {job.job_id} ({state}) {cause}; log: {job.paths.stderr}"
            log.error(f"#{idx} FAILED: {error}")
            folder = _job_folder(sweep_dir, job.job_id)
            if folder is not None:
                write_json(folder / LAUNCHER_FILE,
                           {"job": idx, "overrides": overrides, "slurm_job_id": job.job_id,
                            "slurm_state": state, "status": "failed", "error": error})
            ret = JobReturn(overrides=overrides, working_dir=str(folder or sweep_dir))
            ret.status = JobStatus.FAILED
            ret.return_value = RuntimeError(f"job #{idx}: {error}\n{exc}")
            return ret


def _job_folder(sweep_dir: Path, job_id: str) -> Optional[Path]:
    """Where SLURM task ``job_id`` ran (its .hydra/hydra.yaml's hydra.job.id); None: no folder."""
    for path in sweep_dir.glob("**/.hydra/hydra.yaml"):
        if str(OmegaConf.select(OmegaConf.load(path), "hydra.job.id")) == job_id:
            return path.parent.parent
    return None

