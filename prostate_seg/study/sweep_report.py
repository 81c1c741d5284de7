"""The Hydra callback that writes the study's report when a multirun ends
(``hydra.callbacks.sweep_report`` in conf/hydra/default.yaml). Hydra instantiates every
callback in every run, so the report's imports (numpy, scipy, matplotlib) wait until a sweep
ends: a single run, and a command line that stops on a mistake, start without them."""

from __future__ import annotations

import atexit
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prostate_seg.study.sweeps import DEFAULT_BASELINE

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Write the report when a multirun ends. Hydra skips ``on_multirun_end`` when a job
    failed, so the report is also written at exit then; a report problem is logged, never
    raised (it must not turn a finished sweep into a failed one). Settings in the sweep's
    config: ``report.baseline`` (bce; every pair when the sweep has none), ``report.all_pairs``
    and ``report.allow_mixed_code``."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.sweep_dir: Path | None = None
        self.started = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # A copy for a job's own process (gpu_pool): the report is the sweep process's.
        return {"settings": {}, "sweep_dir": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = config.get("report") or {}
        baseline = settings.get("baseline", DEFAULT_BASELINE)
        self.settings = {"baseline": None if baseline == DEFAULT_BASELINE else baseline,
                         "all_pairs": bool(settings.get("all_pairs", False)),
                         "allow_mixed_code": bool(settings.get("allow_mixed_code", False))}
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.started = time.time()
        atexit.register(self.write)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write()

    def launched(self) -> bool:
        """Whether this sweep got past its checks: Hydra writes multirun.yaml only then (a
        refused sweep must not rewrite the report of the sweep running in the folder)."""
        record = self.sweep_dir / "multirun.yaml" if self.sweep_dir else None
        return record is not None and record.is_file() and record.stat().st_mtime >= self.started

    def write(self) -> None:
        if not self.launched():
            return  # no job started (stopped by the checks before launch)
        sweep_dir, self.sweep_dir = self.sweep_dir, None
        try:
            from prostate_seg.study.report import write_report

            write_report(sweep_dir, **self.settings)
        except Exception as exc:  # noqa: BLE001 - a report problem must not hide the sweep's
            log.error("could not write the sweep report for %s: %s", sweep_dir, exc)
