"""TensorBoard as it opens: the study's few settings beside its metrics in HPARAMS, and the
Dice and loss curves first in Time Series.

HPARAMS shows the first five columns of a run's settings (by name, when none is marked as
differing, as Lightning's ``log_hyperparams`` marks none), so a run logs five: loss, alpha,
fold, seed, lr; beta (1 - alpha in the study, spelled in the loss name otherwise) and the rest
are in the run folder's hparams.yaml. TensorBoard takes the columns of one run's record: a loss
without an alpha (bce) records alpha as the text "None", so the column is there whichever run
it reads, and is numeric when it reads a Tversky run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from prostate_seg.training.module import HP_METRIC

COLUMNS = ("loss", "alpha", "fold", "seed", "lr")
# The study's number (per patient, original size, on the fold's validation patients, logged
# when the run ends) and the selection Dice that chose the checkpoint; 0 until measured.
VALIDATION_DICE = "hp/val_dice_original"
METRICS = {VALIDATION_DICE: 0.0, HP_METRIC: 0.0}


class TensorBoardDashboard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar Lightning adds to every log:
    TensorBoard's Time Series would open on its card, before the Dice and loss curves. (The CSV
    history keeps the epoch.)"""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


@rank_zero_only
def log_settings(loggers: list[Logger], settings: dict[str, Any]) -> None:
    """The run's settings to every logger: TensorBoard's hparams.yaml (all) and HPARAMS tab
    (``COLUMNS``), the others' params. The CSV history gets none (its hparams.yaml would repeat
    TensorBoard's)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(settings)  # without metrics: hparams.yaml only
            logger.log_hyperparams({k: settings[k] for k in COLUMNS}, metrics=METRICS)
        elif not isinstance(logger, CSVLogger):
            logger.log_hyperparams(settings)


@rank_zero_only
def log_validation_dice(loggers: list[Logger], value: float, step: int) -> None:
    """The study's number, once the run has scored its validation patients."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_scalar(VALIDATION_DICE, value, step)
            logger.experiment.flush()
