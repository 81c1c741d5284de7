"""TensorBoard's HPARAMS tab: each run's settings as columns beside its headline numbers.

Every run writes the same experiment config (the columns, their types, the metrics) and its
own values. Without a config TensorBoard takes one run's, whose columns carry no ``differs``
mark, and ticks the first five by name (alpha, batch_size, beta, context_slices, features):
loss, lr and image_size stayed unticked. It ticks at most five hparams, the marked ones
first, and the first five metrics: beta (1 - alpha for every Tversky run) is the one left a
click away, since alpha says the same. A value of another type than its column's (BCE's alpha
``"-"``) is left out, so alpha and beta stay numeric columns and BCE's cells are empty.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from prostate_seg.training.module import HP_METRIC

# Ticked by default: what tells a study's runs apart. The other columns are a click away.
TICKED = ("loss", "alpha", "lr", "fold", "seed")
TEXT_COLUMNS = ("loss", "net", "features", "scheduler")
# The study's number (per patient, original size, on the fold's validation patients, logged
# when the run ends), the selection Dice that chose the checkpoint, and the curves' last values.
VALIDATION_DICE = "hp/val_dice_original"
METRICS = (VALIDATION_DICE, HP_METRIC, "select/dice", "select/loss", "train/loss")


def experiment_summary(columns: list[str]) -> Summary:
    """The HPARAMS tab's config: the same for every run with these columns."""
    infos = [api_pb2.HParamInfo(
        name=name, differs=name in TICKED,
        type=api_pb2.DATA_TYPE_STRING if name in TEXT_COLUMNS else api_pb2.DATA_TYPE_FLOAT64)
        for name in columns]
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in METRICS])
    content = plugin_data_pb2.HParamsPluginData(experiment=experiment,
                                                version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                        content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG,
                                        metadata=SummaryMetadata(plugin_data=plugin))])


def column_values(settings: dict[str, Any]) -> dict[str, Any]:
    """Each setting as its column's type; one of another type (``"-"`` for no alpha) is left
    out."""
    values: dict[str, Any] = {}
    for name, value in settings.items():
        if name in TEXT_COLUMNS:
            values[name] = str(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = value
    return values


@rank_zero_only
def log_settings(loggers: list[Logger], settings: dict[str, Any]) -> None:
    """The run's settings to every logger: TensorBoard's HPARAMS tab, the others' params."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.hparams.update(settings)  # its hparams.yaml in the run folder
            _, start, end = hparams_summaries(column_values(settings), {})
            writer = logger.experiment._get_file_writer()
            for summary in (experiment_summary(list(settings)), start, end):
                writer.add_summary(summary)
        else:
            logger.log_hyperparams(settings)


@rank_zero_only
def log_validation_dice(loggers: list[Logger], value: float, step: int) -> None:
    """The study's number, once the run has scored its validation patients."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_scalar(VALIDATION_DICE, value, step)
            logger.experiment.flush()
