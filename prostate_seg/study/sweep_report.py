"""Hydra callback writing the study's report when a multirun ends. Every run instantiates
it, so the report's heavy imports wait until a sweep ends."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prostate_seg.jobs import DEFAULT_BASELINE
from prostate_seg.runs import RunLock

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Writes the report when a multirun ends, or at exit (Hydra skips ``on_multirun_end`` after
    a failed job); a report problem is logged, never raised."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.sweep_dir: Path | None = None
        self.record_before: int | None = None  # multirun.yaml's mtime (ns) as the sweep began

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
        record = self.sweep_dir / "multirun.yaml"
        self.record_before = record.stat().st_mtime_ns if record.is_file() else None
        atexit.register(self.write)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write()

    def launched(self) -> bool:
        """Hydra writes multirun.yaml only for a sweep past its checks: a refused one must
        not rewrite the running sweep's report. A job folder shows a job started (sbatch may
        refuse the whole array)."""
        record = self.sweep_dir / "multirun.yaml" if self.sweep_dir else None
        return (record is not None and record.is_file()
                and record.stat().st_mtime_ns != self.record_before  # written by this sweep
                and any(p.is_dir() and not p.name.startswith(".")
                        for p in self.sweep_dir.iterdir()))

    def write(self) -> None:
        if not self.launched() or RunLock(self.sweep_dir).held_by_another():
            return  # no job started (stopped by the checks), or another sweep's folder
        sweep_dir, self.sweep_dir = self.sweep_dir, None
        try:
            from prostate_seg.study.report import write_report

            write_report(sweep_dir, **self.settings)
        except Exception as exc:  # noqa: BLE001 - a report problem must not hide the sweep's
            log.error("could not write the sweep report for %s: %s", sweep_dir, exc)
