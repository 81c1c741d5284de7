"""The start-up check of a training config, before any data is read or a GPU touched: each
problem is one line naming the key, the value and what is allowed."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from prostate_seg.config import check_extras_installed, uses_gpu
from prostate_seg.errors import ConfigError
from prostate_seg.study.runs import processes

log = logging.getLogger(__name__)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {allowed}")


@dataclass(frozen=True)
class Setting:
    """A number (``kind=int``: an integer) in [low, high], open ends exclusive; ``high`` may
    name another key (data.fold < data.folds); ``also`` lists extra allowed values (-1)."""

    kind: type
    low: float
    high: float | str | None = None
    open_low: bool = False
    open_high: bool = False
    also: tuple[int, ...] = ()

    def allows(self, value: object, high: float | None) -> bool:
        types = int if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, types):
            return False
        if value in self.also:
            return True
        low_ok = value > self.low if self.open_low else value >= self.low
        high_ok = high is None or (value < high if self.open_high else value <= high)
        return math.isfinite(value) and low_ok and high_ok

    def describe(self, high: float | None) -> str:
        """``an integer in 0..4 (data.folds=5)``, ``an integer >= 1``, ``a number in [0, 1)``."""
        low = f"{self.low:.10g}"
        if high is None:
            kind = "an integer " if self.kind is int else ""
            text = f"{kind}{'>' if self.open_low else '>='} {low}"
        elif self.kind is int:
            bound = f" ({self.high}={high:.10g})" if isinstance(self.high, str) else ""
            text = f"an integer in {low}..{int(high) - self.open_high}{bound}"
        else:
            text = (f"a number in {'(' if self.open_low else '['}{low}, {high:.10g}"
                    f"{')' if self.open_high else ']'}")
        return text + "".join(f" (or {v})" for v in self.also)


SEED = Setting(int, 0, 2**32 - 1)  # numpy's and Lightning's range (Lightning replaces others by 0)
# A float seed or a string batch size would fail after the data scan or run with another value.
# Keys absent from the config (a removed callback) are skipped.
TRAIN_SETTINGS: dict[str, Setting] = {
    "seed": SEED,
    "data.split_seed": SEED,
    "data.batch_size": Setting(int, 1),
    "data.num_workers": Setting(int, 0),
    "data.context_slices": Setting(int, 0),
    "data.folds": Setting(int, 2),
    "data.fold": Setting(int, 0, "data.folds", open_high=True),
    "data.test_fraction": Setting(float, 0.0, 1.0, open_high=True),
    # the training patients that choose epoch and checkpoint
    "data.select_fraction": Setting(float, 0.0, 1.0, open_low=True, open_high=True),
    "optimizer.lr": Setting(float, 0.0, open_low=True),
    "optimizer.weight_decay": Setting(float, 0.0),
    "trainer.max_epochs": Setting(int, 1, also=(-1,)),
    "trainer.log_every_n_steps": Setting(int, 1),
    "callbacks.early_stopping.patience": Setting(int, 0),
    "callbacks.early_stopping.min_delta": Setting(float, 0.0),
    "callbacks.finite_loss.check_every_n_steps": Setting(int, 1),
    "callbacks.image_grid.num_images": Setting(int, 1),
    "callbacks.image_grid.min_size": Setting(int, 1),
    "callbacks.image_grid.per_row": Setting(int, 1),
    "callbacks.progress_bar.refresh_rate": Setting(int, 0),
}
# Yes/no switches: a string such as resume=no would count as true.
TRAIN_SWITCHES = ("resume", "evaluate_best", "data.cache")
_ABSENT = object()


def check_settings(cfg: DictConfig) -> None:
    """Every present key of ``TRAIN_SETTINGS`` and ``TRAIN_SWITCHES`` has a right value."""
    for key, setting in TRAIN_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        high = setting.high
        if isinstance(high, str):
            high = OmegaConf.select(cfg, high, default=None)
            if not isinstance(high, (int, float)) or isinstance(high, bool):
                continue  # the bound is wrong itself and named by its own entry
        _require(setting.allows(value, high), key, value, f"must be {setting.describe(high)}")
    for key in TRAIN_SWITCHES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        _require(value is _ABSENT or isinstance(value, bool), key, value, "must be true or false")


def check_loss(loss: DictConfig, prefix: str = "loss") -> None:
    """alpha and beta in [0, 1] for every Tversky-like term (also inside a combined loss)."""
    for key in ("alpha", "beta"):
        value = loss.get(key)
        if value is not None:
            _require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0,
                     f"{prefix}.{key}", value, "must be a number in [0, 1]")
    alpha, beta = loss.get("alpha"), loss.get("beta")
    if alpha is not None and beta is not None and not math.isclose(alpha + beta, 1.0):
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


def check_data_dir(data_dir: object) -> None:
    """``data.dir`` is a prepared dataset (torch-free: the command line checks it first)."""
    folder = Path(str(data_dir))
    _require(folder.is_dir(), "data.dir", data_dir,
             "folder not found (make one with python -m prostate_seg prepare)")
    _require((folder / "manifest.csv").is_file(), "data.dir", data_dir, "not a prepared "
             "dataset (no manifest.csv; make one with python -m prostate_seg prepare)")


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


def check_train_config(cfg: DictConfig) -> None:
    """Fail fast, with one line naming the key, on values that cannot work."""
    check_extras_installed(cfg)
    check_tracking_uri(cfg)
    check_loss(cfg.loss)
    from prostate_seg.training.module import build_loss  # torch, only when training

    try:
        build_loss(cfg.loss)  # what check_loss cannot see: smooth, weights vs terms, ...
    except Exception as exc:  # noqa: BLE001 - Hydra wraps the loss's own ValueError
        raise ConfigError(f"loss: {exc.__cause__ or exc}") from None
    check_settings(cfg)
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
    epochs = cfg.trainer.get("max_epochs")
    _require(epochs != -1 or not cfg.get("scheduler"), "trainer.max_epochs", epochs,
             "a learning-rate schedule decays over a finite number of epochs; set one")
    check_data_dir(data.dir)
