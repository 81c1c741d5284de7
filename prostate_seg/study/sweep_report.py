"""The Hydra callback that writes the study's report when a multirun ends
(``hydra.callbacks.sweep_report``). Hydra instantiates every callback in every run, so this one
imports the report (numpy, scipy, matplotlib) only when a multirun starts: a single run, and a
command line that stops on a mistake, start without them."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    """:class:`prostate_seg.study.report.SweepReportCallback`, made when a multirun starts."""

    def __init__(self) -> None:
        self.report: Callback | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy for a job's own process (gpu_pool): the report is the sweep process's.
        return {"report": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from prostate_seg.study.report import SweepReportCallback

        self.report = SweepReportCallback()
        self.report.on_multirun_start(config, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.report is not None:
            self.report.on_multirun_end(config, **kwargs)
