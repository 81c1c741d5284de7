"""MLflow tracking (``logger=mlflow``): an experiment per sweep folder, a run per run folder,
named as on disk (docs/USAGE.md, MLflow)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.loggers import Logger, MLFlowLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from prostate_seg.files import write_json
from prostate_seg.runs import HYDRA_DIR, PER_PATIENT_FILE, RESULTS_FILE, load_json_object
from prostate_seg.training.mlflow_store import RUN_DIR_TAG, experiment_for, open_store

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in the run folder: which MLflow run holds this run
# results.json entries logged as params (the config identity); its other numbers are metrics.
RESULT_PARAMS = ("identity", "group")
RUN_ARTIFACTS = (RESULTS_FILE, PER_PATIENT_FILE, f"{HYDRA_DIR}/config.yaml")


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger named after the run folder; it continues the folder's MLflow run
    when the job resumes and logs images (the validation contours) as artifacts."""

    def __init__(self, run_dir: str, tracking_uri: str, experiment_name: str | None = None,
                 run_name: str | None = None, artifact_location: str | None = None,
                 tags: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        artifacts = open_store(tracking_uri, artifact_location)
        super().__init__(
            experiment_name=experiment_for(self.run_dir.parent, experiment_name),
            run_name=run_name or self.run_dir.name, tracking_uri=tracking_uri,
            tags={**(tags or {}), RUN_DIR_TAG: str(self.run_dir.resolve())},
            artifact_location=artifacts, run_id=self._earlier_run(tracking_uri))
        self._params: set[str] = set()

    def _earlier_run(self, tracking_uri: str) -> str | None:
        """The MLflow run this folder logged to before (a resumed job), if it still exists."""
        earlier = load_json_object(self.run_dir / RUN_FILE)[0] or {}
        if earlier.get("tracking_uri") != tracking_uri or not earlier.get("run_id"):
            return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient(tracking_uri).get_run(earlier["run_id"])
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
        """``params`` less those logged before with another value (MLflow params are fixed)."""
        logged = self.experiment.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if logged.get(k, str(v)) != str(v))
        if changed:
            log.warning("MLflow run %s keeps its earlier %s (now %s)", self.run_id,
                        ", ".join(f"{k}={logged[k]}" for k in changed),
                        ", ".join(f"{k}={params[k]}" for k in changed))
        return {k: v for k, v in params.items() if k not in changed}

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any], metrics: Any = None) -> None:
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
