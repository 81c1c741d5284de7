"""The MLflow store of a run or a sweep, without Lightning: Hydra builds the sweep's callback
(``logger=mlflow``) when it starts, before any check, so it must not import torch."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prostate_seg.training.checks import check_tracking_uri, local_store

log = logging.getLogger(__name__)

RUN_DIR_TAG = "prostate_seg.run_dir"
REPORT_RUN = "report"


def experiment_for(folder: Path, configured: str | None = None) -> str:
    """``configured``, else ``folder`` relative to the working directory when inside it."""
    if configured:
        return configured
    folder = folder.resolve()
    return str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else str(folder)


def open_store(tracking_uri: str, artifact_location: str | None) -> str | None:
    """Make a local database's folder; return the artifact root: ``artifact_location``, else
    mlartifacts/ beside a local database (a URI: every process and ``mlflow ui`` agree)."""
    database = local_store(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    if artifact_location or database is None:
        return artifact_location
    return (database.parent / "mlartifacts").resolve().as_uri()


class MlflowSweep(Callback):
    """Hydra callback of ``logger=mlflow``: creates the sweep's experiment before any job (they
    would race to set up a new SQLite database) and uploads ``<sweep>/report/`` at exit, after
    the report callback wrote it (also when a job failed and Hydra skips on_multirun_end)."""

    def __init__(self) -> None:
        self._upload: tuple[Any, str, Path] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow import MlflowClient

        check_tracking_uri(config)
        settings = config.logger.mlflow
        sweep_dir = Path(config.hydra.sweep.dir)
        artifacts = open_store(settings.tracking_uri, settings.get("artifact_location"))
        client = MlflowClient(settings.tracking_uri)
        name = experiment_for(sweep_dir, settings.get("experiment_name"))
        found = client.get_experiment_by_name(name)
        experiment = (found.experiment_id if found and found.lifecycle_stage != "deleted"
                      else client.create_experiment(name, artifact_location=artifacts))
        self._upload = (client, experiment, sweep_dir)
        atexit.register(self._upload_report)

    def _upload_report(self) -> None:
        if self._upload is None:
            return
        (client, experiment, sweep_dir), self._upload = self._upload, None
        report = sweep_dir / "report"
        if not report.is_dir():
            return
        try:
            runs = client.search_runs([experiment], f"attributes.run_name = '{REPORT_RUN}'")
            run_id = runs[0].info.run_id if runs else client.create_run(
                experiment, run_name=REPORT_RUN, tags={RUN_DIR_TAG: str(sweep_dir.resolve())}
            ).info.run_id
            client.log_artifacts(run_id, str(report), "report")
            client.set_terminated(run_id)
        except Exception as exc:  # noqa: BLE001 - the sweep's results are on disk regardless
            log.error("could not upload %s to MLflow: %s", report, exc)
