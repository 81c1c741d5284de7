"""``hydra/sweeper=optuna_repeated``: hydra-optuna-sweeper's search, with three changes a
study of noisy training runs needs (conf/hydra/sweeper/optuna_repeated.yaml configures it):

  * a trial trains every ``folds`` x ``seeds`` combination (each its own job and run folder)
    and is scored by the mean of their objective: one seed of one fold would let TPE chase
    seed noise;
  * the score is read from each job's ``results.json`` (``objective``), not from the task's
    return value, which launchers that run jobs as separate processes (gpu_pool) do not pass;
  * ``n_trials`` is the number of complete trials the stored study should hold: starting the
    same search again (same study in the same SQLite file) runs only the missing ones, and a
    trial left running by an interruption is run again with the same parameters first, so its
    jobs continue from their own ``last.ckpt``. (The released sweeper runs ``n_trials`` more
    every time and leaves interrupted trials RUNNING forever.)

Search space, sampler, storage and study name are the released sweeper's settings, parsed by
its own code; this class only replaces the loop that asks, launches and tells. As with the
project's study sweeper, the sweep folder is locked while the search runs (one process per
study), and every batch of jobs is checked (``check_job``) and named before it starts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.study_sweeper.study_sweeper import check_and_name_jobs
from prostate_seg.cli import exit_on_user_error
from prostate_seg.runs import RESULTS_FILE, RunLock, read_json
from prostate_seg.search import OBJECTIVE

log = logging.getLogger(__name__)

INSTALL_HINT = 'hydra/sweeper=optuna_repeated needs Optuna: pip install "prostate-seg[optuna]"'


class RepeatedTrialsSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str],
                 study_name: Optional[str], n_trials: int, n_jobs: int, max_failure_rate: float,
                 params: Optional[DictConfig], folds: Optional[Sequence[int]],
                 seeds: Sequence[int], objective: Optional[str] = None,
                 check_job: Optional[str] = None, search_space: Optional[DictConfig] = None,
                 custom_search_space: Optional[str] = None) -> None:
        try:
            from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        if not seeds or (folds is not None and not folds):
            raise ValueError("hydra.sweeper.seeds and hydra.sweeper.folds (or null) must each "
                             "list at least one value")
        self.search = OptunaSweeperImpl(sampler, direction, storage, study_name, n_trials,
                                        n_jobs, max_failure_rate, search_space,
                                        custom_search_space, params)
        # Each trial's jobs: a data.fold and a seed override per combination.
        self.repeats = [([] if fold is None else [f"data.fold={fold}"]) + [f"seed={seed}"]
                        for fold in (folds if folds is not None else [None]) for seed in seeds]
        self.objective = objective
        self.check_job = get_method(check_job) if check_job else None
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.search.setup(hydra_context=hydra_context, task_function=task_function,
                          config=config)

    def _score(self, ret: JobReturn) -> float:
        """The job's objective, from the results.json it wrote (its failure, re-raised)."""
        ret.return_value  # noqa: B018 - raises the job's own exception when it failed
        key = self.objective or OBJECTIVE
        results = Path(ret.hydra_cfg.hydra.runtime.output_dir) / RESULTS_FILE
        value = (read_json(results) or {}).get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{results} has no finite {key!r}")
        return float(value)

    @staticmethod
    def _retry_interrupted(study: Any) -> None:
        """Trials still RUNNING in the stored study were cut off: fail them and queue their
        parameters again, so they are the first trials of this run."""
        import optuna

        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            log.info("trial %d was interrupted; running it again: %s", trial.number, trial.params)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)

    def sweep(self, arguments: List[str]) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's schema set-up chatter
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        assert self.config is not None
        search = self.search
        search._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(
            search._parse_sweeper_params_config() + list(arguments))
        distributions = {**(search.search_space_distributions or {}), **distributions}
        for name in fixed:
            distributions.pop(name, None)
        directions = search._get_directions()
        if len(directions) != 1:
            raise ValueError("hydra/sweeper=optuna_repeated optimises one objective")

        lock = RunLock(Path(self.config.hydra.sweep.dir), what="sweep folder")
        with exit_on_user_error():
            lock.acquire()  # also makes the folder, where the study's SQLite file may live
        try:
            self._search(distributions, fixed, directions[0])
        finally:
            lock.release()

    def _search(self, distributions: Dict[str, Any], fixed: Dict[str, Any],
                direction: str) -> None:
        import optuna

        assert self.config is not None
        search = self.search
        study = optuna.create_study(study_name=search.study_name, storage=search.storage,
                                    sampler=search.sampler, direction=direction,
                                    load_if_exists=True)
        self._retry_interrupted(study)
        complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        to_go = search.n_trials - complete
        log.info("study %s in %s: %d of %d trials complete, %d jobs per trial", study.study_name,
                 search.storage, complete, search.n_trials, len(self.repeats))

        job_idx = 0
        while to_go > 0:
            trials = [study.ask() for _ in range(min(search.n_jobs, to_go))]
            jobs = [[*trial_overrides, *repeat]
                    for trial_overrides in search._configure_trials(trials, distributions, fixed)
                    for repeat in self.repeats]
            with exit_on_user_error():
                names = check_and_name_jobs(self.config, search.hydra_context, self.check_job,
                                            jobs, swept_keys=list(distributions))
            returns = search.launcher.launch([job + names[tuple(job)] for job in jobs],
                                             initial_job_idx=job_idx)
            job_idx += len(returns)
            failures = []
            for i, trial in enumerate(trials):
                own = returns[i * len(self.repeats):(i + 1) * len(self.repeats)]
                try:
                    values = [self._score(ret) for ret in own]
                except Exception as exc:  # noqa: BLE001 - any failed job fails its trial
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %d failed: %s", trial.number, exc)
                    failures.append(exc)
                    continue
                study.tell(trial, math.fsum(values) / len(values))
            if failures and len(failures) / len(trials) > search.max_failure_rate:
                raise RuntimeError(f"{len(failures)} of {len(trials)} trials failed "
                                   f"(hydra.sweeper.max_failure_rate={search.max_failure_rate})"
                                   ) from failures[0]
            to_go -= len(trials)

        best = study.best_trial
        log.info("best trial %d: %s = %.4f", best.number, best.params, best.value)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params,
                                         "best_value": best.value, "study": study.study_name,
                                         "storage": search.storage}),
                       Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")
