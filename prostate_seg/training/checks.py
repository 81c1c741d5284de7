"""The start-up check of a training config, before any data is read or a GPU touched: each
problem is one line naming the key, the value and what is allowed."""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from prostate_seg.config import build, check_extras_installed, uses_gpu
from prostate_seg.errors import ConfigError, one_line
from prostate_seg.files import check_data_dir
from prostate_seg.settings import check_loss_numbers, check_settings, normalised, shown
from prostate_seg.runs import processes
from prostate_seg.training.signatures import check_arguments

log = logging.getLogger(__name__)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={shown(value)}: {allowed}")


OWN_LOSSES = "prostate_seg.losses."


def check_loss(loss: DictConfig, prefix: str = "loss") -> None:
    """This project's losses' numbers in range, also inside a combined loss, by their keys."""
    if str(loss.get("_target_", "")).startswith(OWN_LOSSES):
        check_loss_numbers(loss, prefix)
    alpha, beta = loss.get("alpha"), loss.get("beta")
    if alpha is not None and beta is not None and not normalised(alpha, beta):
        log.warning("%s.alpha + %s.beta = %s, not 1: the index is not a Tversky-normalised "
                    "F-score any more", prefix, prefix, alpha + beta)
    for name, term in (loss.get("terms") or {}).items():
        check_loss(term, f"{prefix}.terms.{name}")


def check_ddp_launch(trainer: DictConfig, hydra: DictConfig | None) -> None:
    """Lightning starts DDP's other processes by running the command line again; in a sweep
    run inside this process (Hydra's basic launcher) that command line is the whole sweep."""
    strategy = trainer.get("strategy")
    strategy = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy
    if hydra is None or "ddp" not in str(strategy).lower() or trainer.get("devices") == 1:
        return
    in_process = str(OmegaConf.select(hydra, "launcher._target_", default="")).endswith(
        "BasicLauncher")
    if str(hydra.get("mode")) == "RunMode.MULTIRUN" and in_process:
        raise ConfigError("trainer=ddp: a sweep's jobs run inside this process, where DDP cannot "
                          "start its other processes; use hydra/launcher=gpu_pool (a fresh "
                          "process per job), or run the job on its own")


def check_input_size(model: DictConfig, image_size: object) -> None:
    """A network that does not pad (MONAI's) declares ``model.input_multiple``; this project's
    U-Net pads any size but needs 2^depth pixels to reach its bottleneck."""
    multiple = model.get("input_multiple")
    if multiple is not None:
        _require(isinstance(image_size, int) and image_size > 0 and image_size % multiple == 0,
                 "data.image_size", image_size,
                 f"must be a multiple of model.input_multiple = {multiple} "
                 f"({model.net._target_} does not pad its input)")
        return
    depth = len(model.net.features)
    _require(isinstance(image_size, int) and image_size >= 2**depth,
             "data.image_size", image_size,
             f"must be an integer >= 2^depth = {2**depth} for a U-Net with {depth} levels")


def check_output(net: Any, model: DictConfig, context_slices: int, image_size: int) -> None:
    """One logit per pixel for the channels the data gives (1 + 2 * data.context_slices): the
    losses and metrics are binary, and a network of other channels fails only in its first
    training step. One pass of zeros, at a small size the network halves twice at bottom (fast
    for a sweep's every job) or, if that fails, at data.image_size (a network of fixed size)."""
    import torch

    given = 1 + 2 * context_slices
    for key, value, allowed in (
            ("model.net.out_channels", 1, "must be 1 (one logit per pixel: the losses and "
             "metrics are binary)"),
            ("model.net.in_channels", given, f"the data gives {given} channel(s) per slice "
             f"(1 + 2 x data.context_slices={context_slices})")):
        setting = OmegaConf.select(model, key.removeprefix("model."), default=None)
        _require(setting in (None, value), key, setting, allowed)
    small = 2 * (model.get("input_multiple") or 2 ** len(model.net.features))
    for size in dict.fromkeys((min(small, image_size), image_size)):
        x = torch.zeros(1, given, size, size)
        try:
            with torch.no_grad():
                out = net.eval()(x)
            break
        except Exception as exc:  # noqa: BLE001 - whatever the network raises on its input
            failure = exc
    else:
        raise ConfigError(f"model.net: fails on a {tuple(x.shape)} input (data.image_size, "
                          f"{given} channel(s)): {one_line(failure)}") from None
    want = (1, 1, size, size)
    _require(tuple(out.shape) == want, "model.net",
             OmegaConf.to_container(model.net).get("_target_"),
             f"the network gives {tuple(out.shape)} for a {tuple(x.shape)} input; the losses and "
             f"metrics need one logit per pixel, {want}")


# The tracking stores MLflow has (mlflow.tracking._tracking_service.utils); plugins add theirs.
MLFLOW_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc", "sqlite",
                  "postgresql", "mysql", "mssql")
_SQLITE = "sqlite:///"


def local_store(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(tracking_uri[len(_SQLITE):]) if tracking_uri.startswith(_SQLITE) else None


def check_tracking_uri(cfg: DictConfig) -> None:
    """``logger.mlflow.tracking_uri`` is a store MLflow has and, when local, one it can write:
    refused before the data check, not after the run folder was claimed."""
    uri = OmegaConf.select(cfg, "logger.mlflow.tracking_uri", default=None)
    if uri is None:
        return
    uri, key = str(uri), "logger.mlflow.tracking_uri"
    scheme = urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2: the database, a driver
    plugins = {e.name for e in entry_points(group="mlflow.tracking_store")}
    _require(scheme in MLFLOW_SCHEMES or scheme in plugins, key, uri,
             f"MLflow has no tracking store for {scheme}: (use sqlite:///FILE, a folder, "
             "file:FOLDER or http(s)://HOST:PORT)")
    if scheme not in ("", "file", "sqlite"):
        return
    folder = local_store(uri)
    folder = Path(urlparse(uri).path) if folder is None else folder.parent
    made = next(p for p in (folder, *folder.parents) if p.exists())
    _require(made.is_dir(), key, uri, f"{made} is a file, not a folder")
    _require(os.access(made, os.W_OK | os.X_OK), key, uri, f"{made} is not writable")


def instantiate_checked(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node)``, or one line naming ``key`` and what the object said (or, before
    it is built, an argument its signature does not take)."""
    from hydra.errors import InstantiationException

    check_arguments(key, node, given=kwargs)
    try:
        return build(node, **kwargs)
    except InstantiationException as exc:
        text = one_line(exc.__cause__ or exc)
        raise ConfigError(text if text.startswith(key) else f"{key}: {text}") from None


def _calls(key: str, partial: Any, **kwargs: Any) -> Any:
    """``partial(**kwargs)`` (an optimizer's or scheduler's ``_partial_``), or one line naming
    ``key``: a misspelt or mistyped argument (``+optimizer.foo=1``) shows only when called."""
    try:
        return partial(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(f"{key}: {one_line(exc)}") from None


def check_monitors(cfg: DictConfig) -> None:
    """A callback's monitor names a metric the run logs (Lightning finds out after an epoch),
    and its mode is the metric's direction: select/loss with mode=max would keep the worst
    epoch without a word."""
    from prostate_seg.training.module import LOGGED, better

    for name, entry in (cfg.get("callbacks") or {}).items():
        monitor = entry.get("monitor") if isinstance(entry, DictConfig) else None
        # without a monitor a checkpoint keeps the latest epoch; early stopping watches nothing
        stops = isinstance(entry, DictConfig) and str(entry.get("_target_")).endswith(
            "EarlyStopping")
        _require((monitor is None and not stops) or monitor in LOGGED,
                 f"callbacks.{name}.monitor", monitor,
                 f"not a metric the run logs; choose one of {', '.join(LOGGED)}")
        if monitor is None or not (str(entry.get("_target_")).endswith(
                ("ModelCheckpoint", "EarlyStopping")) or "mode" in entry):
            continue
        mode, wanted = entry.get("mode", "min"), better(monitor)  # Lightning's default: min
        _require(mode == wanted or mode not in ("min", "max"),  # Lightning names other values
                 f"callbacks.{name}.mode", mode,
                 f"must be {wanted} for monitor={monitor}, which "
                 f"{'falls' if wanted == 'min' else 'rises'} as the run improves (mode={mode} "
                 "keeps the worst epoch)")


def check_checkpoint_files(callbacks: DictConfig | None) -> None:
    """A monitored checkpoint writes a file of its own: named as last.ckpt (filename=last) it is
    overwritten every epoch by the resume point, and the "best" weights are the last epoch's."""
    written = {}
    for name, entry in (callbacks or {}).items():
        if isinstance(entry, DictConfig) and "filename" in entry:
            written[name] = (os.path.abspath(str(entry.get("dirpath"))), str(entry.filename))
    for name, entry in (callbacks or {}).items():
        if name not in written or entry.get("monitor") is None:
            continue
        for other, place in written.items():
            _require(other == name or place != written[name], f"callbacks.{name}.filename",
                     written[name][1], f"callbacks.{other} writes that file too (each epoch); "
                     "the best weights would be replaced: choose another name")


def check_validation_interval(trainer: DictConfig, batches: int) -> None:
    """An integer val_check_interval counts training batches: more than an epoch has (after
    limit_train_batches) fails in Lightning's fit, once the run's folder is made, unless
    check_val_every_n_epoch=null lets it count across epochs."""
    interval, limit = trainer.get("val_check_interval"), trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    _require(not isinstance(interval, int) or isinstance(interval, bool) or interval <= batches
             or trainer.get("check_val_every_n_epoch", 1) is None,
             "trainer.val_check_interval", interval, f"must be at most the {batches} training "
             "batches of an epoch (or a fraction of an epoch, such as 0.5)")


def check_builds(cfg: DictConfig) -> None:
    """Lightning's, torch's and Hydra's own checks of what a run builds (accelerator, precision,
    a callback's mode, an optimizer's arguments, a schedule's formula), before the run folder is
    claimed; the loggers, which write into it, only have their arguments checked."""
    import torch
    from hydra.utils import get_object

    from prostate_seg.training.callbacks import without_bar
    from prostate_seg.training.module import PLATEAU_MONITOR, better

    callbacks = [instantiate_checked(f"callbacks.{name}", entry)
                 for name, entry in (cfg.get("callbacks") or {}).items() if entry is not None]
    if cfg.trainer.get("enable_progress_bar") is False:  # the run leaves the bar out
        callbacks = without_bar(callbacks)
    instantiate_checked("trainer", cfg.trainer, callbacks=callbacks, logger=False)
    for name, entry in (cfg.get("logger") or {}).items():
        if entry is None:
            continue
        try:
            get_object(entry._target_)
        except Exception as exc:  # noqa: BLE001 - Hydra's words for a target it cannot import
            raise ConfigError(f"logger.{name}._target_={entry._target_}: {one_line(exc)}") from None
        check_arguments(f"logger.{name}", entry)
    optimizer = _calls("optimizer", instantiate_checked("optimizer", cfg.optimizer),
                       params=[torch.zeros(1, requires_grad=True)])
    if cfg.get("scheduler"):
        scheduler = _calls("scheduler", instantiate_checked("scheduler", cfg.scheduler),
                           optimizer=optimizer)
        reads = {}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            _require(scheduler.mode == better(PLATEAU_MONITOR), "scheduler.mode", scheduler.mode,
                     f"must be {better(PLATEAU_MONITOR)}: the schedule reads {PLATEAU_MONITOR}, "
                     "which rises as the run improves")
            reads = {"metrics": 0.5}
        optimizer.step()  # no gradients: nothing changes; then the schedule's formula runs once
        _calls("scheduler", scheduler.step, **reads)


def check_train_config(cfg: DictConfig) -> None:
    """Fail fast, with one line naming the key, on values that cannot work."""
    check_extras_installed(cfg)
    check_tracking_uri(cfg)
    check_loss(cfg.loss)
    from prostate_seg.training.module import build_loss  # torch, only when training

    try:
        build_loss(cfg.loss)  # what check_loss cannot see: smooth, weights vs terms, ...
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the loss's own ValueError
        raise ConfigError(f"loss: {one_line(exc.__cause__ or exc)}") from None
    net = instantiate_checked("model.net", cfg.model.net)  # its own checks (model.net.norm)
    for group in ("callbacks", "logger"):  # settings left of an entry its option removed
        for name, entry in (cfg.get(group) or {}).items():
            _require(entry is None or isinstance(entry, DictConfig), f"{group}.{name}", entry,
                     f"set it to null to leave {name} out, or give its settings")
            _require(entry is None or "_target_" in entry, f"{group}.{name}",
                     OmegaConf.to_container(entry) if entry is not None else None,
                     f"has no _target_ to build it from (the {group} option in use leaves "
                     f"{name} out: drop these settings, or choose an option that has it)")
    scheduler = cfg.get("scheduler")
    _require(not scheduler or "_target_" in scheduler, "scheduler",
             OmegaConf.to_container(scheduler) if scheduler else None,
             "has no _target_ to build it from (choose one: scheduler=cosine, poly or plateau)")
    check_settings(cfg, "train")
    check_monitors(cfg)
    check_checkpoint_files(cfg.get("callbacks"))
    sync = cfg.trainer.get("sync_batchnorm")
    _require(not processes(cfg.trainer)["trainer.sync_batchnorm"]
             or uses_gpu(str(cfg.trainer.get("accelerator"))), "trainer.sync_batchnorm", sync,
             "torch shares BatchNorm statistics between GPU processes only (SyncBatchNorm); on "
             "the CPU set it false, and each process normalises with its own")
    data = cfg.data
    devices = cfg.trainer.get("devices")
    _require(not isinstance(devices, int) or devices < 1 or data.batch_size % devices == 0,
             "data.batch_size", data.batch_size,
             f"is the global batch: it must divide evenly over trainer.devices={devices}")
    check_input_size(cfg.model, data.image_size)
    check_output(net, cfg.model, data.context_slices, data.image_size)
    epochs, schedule = cfg.trainer.get("max_epochs"), cfg.get("scheduler") or {}
    lengths = ("T_max", "total_iters")  # cosine's and poly's length (torch divides by it)
    _require(epochs != -1 or not any(key in schedule for key in lengths), "trainer.max_epochs",
             epochs, "the learning-rate schedule decays over a finite number of epochs; set one "
             "(or scheduler=plateau, which needs none)")
    for key in lengths:
        length = schedule.get(key)
        _require(length is None or (type(length) is int and length >= 1), f"scheduler.{key}",
                 length, "must be an integer >= 1 (the schedule's length in epochs)")
    check_builds(cfg)
    check_data_dir(data.dir)
