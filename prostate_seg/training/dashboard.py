"""TensorBoard as it opens: five study settings beside the Dice in HPARAMS (it shows the first
five columns), and the Dice and loss curves first in Time Series."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from prostate_seg.training.module import HP_METRIC

COLUMNS = ("loss", "alpha", "fold", "seed", "lr")
# The study's number (per patient, original size, the fold's validation patients; logged when
# the run ends) and the selection Dice that chose the checkpoint; 0 until measured.
VALIDATION_DICE = "hp/val_dice_original"
METRICS = {VALIDATION_DICE: 0.0, HP_METRIC: 0.0}


class TensorBoardDashboard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``epoch`` scalar, whose card would come first
    in Time Series (the CSV history keeps the epoch)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


@rank_zero_only
def log_settings(loggers: list[Logger], settings: dict[str, Any]) -> None:
    """All settings to TensorBoard's hparams.yaml and other loggers' params, ``COLUMNS`` to
    HPARAMS; none to the CSV history (its hparams.yaml would repeat TensorBoard's)."""
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
