"""MLflow tracking: ``logger=mlflow``, or ``logger=tensorboard_mlflow`` for both.

How runs appear in MLflow (the same names as on disk):
  * experiment = the folder that holds the run folder: a sweep's folder
    (``outputs/sweeps/2026-01-01/12-00-00``), or for single runs their date folder
    (``outputs/runs/2026-01-01``); shown relative to the working directory when inside it;
  * run = the run folder's name (``tversky_a0.25-fold0-seed0``), tagged with its full path;
  * params = the settings that tell runs apart (``training.hparams_of``: loss, alpha,
    beta, seed, fold, ...) and, from ``results.json``, the config identity;
  * metrics = every logged metric per epoch, and ``results.json``'s numbers (the best
    checkpoint's, per patient at original size) as ``results/<key>``;
  * artifacts = ``results.json``, ``per_patient.csv``, the composed config and the
    validation images;
  * a sweep's report is the run named ``report`` of the sweep's experiment.

The default store is a SQLite database under ``outputs/`` with the artifacts beside it in
``outputs/mlartifacts/``; ``logger.mlflow.tracking_uri=http://host:5000`` uses a server. A job
that resumes (``last.ckpt``) continues its MLflow run, found through ``mlflow_run.json`` in the
run folder.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger, MLFlowLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from prostate_seg.files import write_json
from prostate_seg.study.runs import RESULTS_FILE, load_json_object

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in the run folder: which MLflow run holds this run
RUN_DIR_TAG = "prostate_seg.run_dir"
REPORT_RUN = "report"
# results.json entries logged as params (the config identity); its other numbers are metrics.
RESULT_PARAMS = ("identity", "group")
RUN_ARTIFACTS = (RESULTS_FILE, "per_patient.csv", ".hydra/config.yaml")
_SQLITE = "sqlite:///"


def experiment_for(folder: Path, configured: str | None = None) -> str:
    """``configured``, else ``folder`` relative to the working directory when inside it."""
    if configured:
        return configured
    folder = folder.resolve()
    return str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else str(folder)


def local_store(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for a server)."""
    return Path(tracking_uri[len(_SQLITE):]) if tracking_uri.startswith(_SQLITE) else None


def artifact_root(tracking_uri: str, configured: str | None) -> str | None:
    """``configured``, else ``mlartifacts/`` beside a local database (as a URI, so that every
    process and ``mlflow ui`` agree), else None: the server's own default."""
    if configured:
        return configured
    database = local_store(tracking_uri)
    return None if database is None else (database.parent / "mlartifacts").resolve().as_uri()


def open_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created when missing (or only deleted)."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage != "deleted":
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _make_store_folder(tracking_uri: str) -> None:
    database = local_store(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    _make_store_folder(tracking_uri)
    return MlflowClient(tracking_uri)


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger named after the run folder; it continues the folder's MLflow run
    when the job resumes and logs images (the validation contours) as artifacts."""

    def __init__(self, run_dir: str, tracking_uri: str, experiment_name: str | None = None,
                 run_name: str | None = None, artifact_location: str | None = None,
                 tags: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        _make_store_folder(tracking_uri)
        super().__init__(
            experiment_name=experiment_for(self.run_dir.parent, experiment_name),
            run_name=run_name or self.run_dir.name, tracking_uri=tracking_uri,
            tags={**(tags or {}), RUN_DIR_TAG: str(self.run_dir.resolve())},
            artifact_location=artifact_root(tracking_uri, artifact_location),
            run_id=self._earlier_run(tracking_uri))
        self._params: set[str] = set()

    def _earlier_run(self, tracking_uri: str) -> str | None:
        """The MLflow run this folder logged to before (a resumed job), if it still exists."""
        earlier = load_json_object(self.run_dir / RUN_FILE)[0] or {}
        if earlier.get("tracking_uri") != tracking_uri or not earlier.get("run_id"):
            return None
        from mlflow.exceptions import MlflowException

        try:
            _client(tracking_uri).get_run(earlier["run_id"])
        except MlflowException:
            return None
        return earlier["run_id"]

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        created = not self._initialized
        client = super().experiment
        if created:
            write_json(self.run_dir / RUN_FILE, {
                "tracking_uri": self._tracking_uri, "experiment_id": self._experiment_id,
                "experiment": self._experiment_name, "run_id": self._run_id})
        return client

    def _unchanged(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` less those this run logged before with another value: MLflow params
        cannot change, so a run continued under another setting keeps its first ones."""
        logged = self.experiment.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if logged.get(k, str(v)) != str(v))
        if changed:
            log.warning("MLflow run %s keeps its earlier %s (now %s)", self.run_id,
                        ", ".join(f"{k}={logged[k]}" for k in changed),
                        ", ".join(f"{k}={params[k]}" for k in changed))
        return {k: v for k, v in params.items() if k not in changed}

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any], metrics: Any = None) -> None:
        """As TensorBoard's (``metrics`` there sets the HPARAMS tab's starting value; MLflow
        needs none)."""
        super().log_hyperparams(self._unchanged(params))
        self._params.update(params)

    @rank_zero_only
    def log_image(self, key: str, images: list[Tensor], step: int) -> None:
        """Images (C, H, W in [0, 1]) as ``<key>/step<step>[_<i>].png`` artifacts."""
        for i, image in enumerate(images):
            pixels = (image.detach().float().clamp(0, 1) * 255).byte().permute(1, 2, 0)
            suffix = f"_{i}" if len(images) > 1 else ""
            self.experiment.log_image(self.run_id, np.ascontiguousarray(pixels.cpu().numpy()),
                                      artifact_file=f"{key}/step{step:04d}{suffix}.png")

    @rank_zero_only
    def log_run_files(self) -> None:
        """results.json's numbers and identity, and the run folder's result files."""
        from mlflow.entities import Metric, Param

        results = load_json_object(self.run_dir / RESULTS_FILE)[0] or {}
        params = [Param(k, str(v)) for k, v in self._unchanged(
            {k: results[k] for k in RESULT_PARAMS if k in results and k not in self._params}
        ).items()]
        now, step = int(time.time() * 1000), int(results.get("epochs_trained") or 0)
        metrics = [Metric(f"results/{k}", float(v), now, step) for k, v in results.items()
                   if isinstance(v, (int, float)) and k not in self._params
                   and k not in RESULT_PARAMS]
        self.experiment.log_batch(self.run_id, metrics=metrics, params=params)
        for name in RUN_ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.experiment.log_artifact(self.run_id, str(self.run_dir / name))


def log_run_files(loggers: Iterable[Logger]) -> None:
    """Call when a run's files are complete: each MLflow run receives them."""
    for logger in loggers:
        if isinstance(logger, MLflowRunLogger):
            logger.log_run_files()


class MlflowSweep(Callback):
    """Hydra callback of ``logger=mlflow`` for sweeps: creates the sweep's experiment before any
    job starts (parallel jobs would race to set up a new SQLite database) and, when the
    sweep process exits, uploads ``<sweep>/report/`` as the experiment's run ``report``.

    The upload runs at exit, after the report callback (``hydra/default.yaml``) has written the
    report, also when a job failed (Hydra then skips ``on_multirun_end``); this callback is
    listed first, so its exit handler runs after the report's.
    """

    def __init__(self) -> None:
        self._upload: tuple[Any, str, Path] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = config.logger.mlflow
        sweep_dir = Path(config.hydra.sweep.dir)
        client = _client(settings.tracking_uri)
        experiment = open_experiment(
            client, experiment_for(sweep_dir, settings.get("experiment_name")),
            artifact_root(settings.tracking_uri, settings.get("artifact_location")))
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
