"""What a run leaves in its folder, read and written in one place, and what a run is.

    <run>/.hydra/config.yaml     composed config (Hydra; rewritten whenever a job starts here)
    <run>/status.json            running | completed | failed | interrupted, times, traceback,
                                 and the run's config identity
    <run>/results.json           metrics of the best checkpoint, epochs trained, identity
    <run>/per_patient.csv        the best checkpoint per patient at the scan's original size
    <run>/metrics/version_N/metrics.csv   every epoch's logged metrics (Lightning's
                                 CSVLogger; each start of the run writes a version)
    <run>/val_preview.npz        the best model's output on fixed validation slices
    <run>/checkpoints/           best-*.ckpt, last.ckpt
    <run>/events.out.tfevents.*  TensorBoard
    <run>/.lock                  held by the process working in the folder

A run's **identity** is a hash of every setting that changes its result (not output paths,
devices, launcher, logging or speed settings); the dataset enters by its content, not its
path. Its **group** is the same without the seed and the fold: runs of one group are
repetitions of one configuration, which the report pools.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout, lock_descriptor
from omegaconf import DictConfig, OmegaConf

from prostate_seg.errors import ConfigError
from prostate_seg.files import write_json

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
PER_PATIENT_FILE = "per_patient.csv"
METRICS_FILE = "metrics.csv"
METRICS_DIR = "metrics"  # CSVLogger's: metrics/version_N/metrics.csv, one version per start
# results.json: the mean per-patient Dice of the fold's validation patients at original size
OBJECTIVE = "val/dice_original"
PREVIEW_FILE = "val_preview.npz"
LOCK_FILE = ".lock"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"

# Settings that do not change what a run computes: where it writes, on which device, how
# fast, what it logs. Everything else is part of its identity, also what a debug= config sets
# that changes the result (trainer.fast_dev_run, trainer.overfit_batches, trainer.max_epochs),
# so a debug run is never resumed, skipped or pooled as a real one; its profiler and anomaly
# detection only measure and check.
NOT_IDENTITY = (
    "hydra", "paths", "logger", "ckpt_path", "resume", "evaluate_best", "study", "report",
    "data.dir", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.cache",
    "model.compile", "model.channels_last", "optimizer.fused",
    "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.sync_batchnorm", "trainer.default_root_dir", "trainer.log_every_n_steps",
    "trainer.enable_progress_bar", "trainer.benchmark", "trainer.num_sanity_val_steps",
    "trainer.profiler", "trainer.detect_anomaly",
    "callbacks.progress_bar", "callbacks.image_grid", "callbacks.lr_monitor",
    "callbacks.metrics_history", "callbacks.interrupt_checkpoint", "callbacks.finite_loss",
    "callbacks.epoch_log", "callbacks.model_checkpoint.dirpath",
    "callbacks.model_checkpoint.filename", "callbacks.last_checkpoint",
    "preprocessing", "split", "identity",
)
REPEAT_KEYS = ("seed", "data.fold")  # what tells the runs of one group apart


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _excluded(key: str, excluded: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in excluded)


def _digest(values: Mapping[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dataset_fingerprint(data_dir: Path) -> str:
    """The prepared dataset by content (its settings and every slice's patient, index, size
    and gland area), so a moved copy is the same data and a re-prepared one is not."""
    digest = hashlib.sha256()
    settings = data_dir / "prepare.json"
    if settings.exists():
        digest.update(json.dumps(json.loads(settings.read_text()), sort_keys=True).encode())
    with open(data_dir / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            digest.update("|".join(str(row.get(k)) for k in (
                "patient", "slice", "height", "width", "gland_pixels")).encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Identity:
    hash: str
    group: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "group": self.group, "config": self.config}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any] | None) -> Identity | None:
        if not stored or "hash" not in stored:
            return None
        return cls(stored["hash"], stored.get("group", ""), dict(stored.get("config") or {}))

    def differences(self, other: Identity) -> list[str]:
        """``key: old -> new`` for every setting that differs (``other`` is the old one)."""
        keys = sorted(set(self.config) | set(other.config))
        return [f"{k}: {other.config.get(k, '(unset)')} -> {self.config.get(k, '(unset)')}"
                for k in keys if self.config.get(k) != other.config.get(k)]


def config_identity(cfg: DictConfig | Mapping[str, Any], dataset: str, split: str) -> Identity:
    """Identity of a run from its config, the dataset fingerprint and the split's hash."""
    container = (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
                 else dict(cfg))
    values = {k: v for k, v in _flatten(container).items() if not _excluded(k, NOT_IDENTITY)}
    values.update({"data.dataset": dataset, "data.split": split})
    group = {k: v for k, v in values.items() if k not in REPEAT_KEYS}
    return Identity(_digest(values), _digest(group), values)


def split_digest(split: Mapping[str, Any]) -> str:
    return _digest(split)


def _stamp_holder(fd: int) -> None:
    """Who holds a lock, written into its file for the message of a process it refuses."""
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())


class RunLock:
    """An exclusive lock on a run (or sweep) folder for the life of the process that holds it:
    filelock's native lock, released by the kernel when the process dies, so a killed job never
    leaves a stale lock. The file stays, with the last holder's name in it."""

    def __init__(self, run_dir: Path, what: str = "run folder"):
        self.path = run_dir / LOCK_FILE
        self.what = what
        self._lock = FileLock(self.path, blocking=False, preserve_lock_file=True,
                              on_acquired=_stamp_holder)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise ConfigError(f"{self.path.parent}: {self.what} in use by {self._holder()}; wait "
                              "for it to end, or write to another folder") from None

    def release(self) -> None:
        self._lock.release()

    def held_by_another(self) -> str | None:
        """Who holds the folder (``pid N on host``), or None when no live process does. Only
        looks: the lock file is opened read-only and never written."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return None if lock_descriptor(fd, blocking=False) else self._holder()
        finally:
            os.close(fd)  # and with it the lock it may have taken

    def _holder(self) -> str:
        try:
            return self.path.read_text(errors="replace").strip() or "another process"
        except OSError:
            return "another process"


def load_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object file a run or a launcher wrote: (content, None), (None, None) when
    absent, or (None, why it is unusable) when unreadable or not an object."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} unreadable ({exc})"
    if not isinstance(content, dict):
        return None, f"{path.name} holds a {type(content).__name__}, not an object"
    return content, None


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """One row per epoch with every metric Lightning's CSVLogger wrote for it (its rows of the
    epoch merged), read from every start's version: an epoch run again after a resume is the
    latest version's. Raises OSError, ValueError or csv.Error on an unreadable file."""
    versions = [p for p in run_dir.glob(f"{METRICS_DIR}/version_*/{METRICS_FILE}")
                if p.parent.name.removeprefix("version_").isdigit()]
    epochs: dict[int, dict[str, float]] = {}
    for path in sorted(versions, key=lambda p: int(p.parent.name.removeprefix("version_"))):
        started: dict[int, dict[str, float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k and v not in ("", None)}
                if "epoch" in values:  # not the learning-rate rows, logged by step only
                    started.setdefault(int(values["epoch"]), {}).update(values)
        epochs.update(started)
    return [epochs[epoch] for epoch in sorted(epochs)]


class RunStatus:
    """Keeps ``status.json`` of a run folder current."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATUS_FILE
        self.record: dict[str, Any] = load_json_object(self.path)[0] or {}

    @property
    def state(self) -> str | None:
        return self.record.get("status")

    def _write(self, **fields: Any) -> None:
        self.record.update(fields, updated=time.time())
        write_json(self.path, self.record)

    @property
    def identity(self) -> Identity | None:
        return Identity.from_dict(self.record.get("identity"))

    def running(self, resumed_from: str | None, identity: Identity) -> None:
        self._write(status="running", started=time.time(), host=socket.gethostname(),
                    pid=os.getpid(), resumed_from=resumed_from, error=None, traceback=None,
                    identity=identity.to_dict())

    def completed(self) -> None:
        self._write(status="completed", finished=time.time())

    def failed(self, exc: BaseException) -> None:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        self._write(status="interrupted" if interrupted else "failed", finished=time.time(),
                    error=f"{type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)))
