"""What a run leaves in its folder, read and written in one place, and what a run is
(its identity and group); the folder layout is in docs/REPORT.md."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import logging.handlers
import math
import os
import socket
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout, lock_descriptor
from omegaconf import DictConfig, ListConfig, OmegaConf

import prostate_seg
from prostate_seg.errors import ConfigError
from prostate_seg.files import write_json, write_text

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
PER_PATIENT_FILE = "per_patient.csv"
LAUNCHER_FILE = "launcher.json"  # written by the launchers: which GPU or SLURM job ran it
METRICS_FILE = "metrics.csv"
METRICS_DIR = "metrics"  # CSVLogger's: metrics/version_N/metrics.csv, one version per start
# results.json: the mean per-patient Dice of the fold's validation patients at original size
OBJECTIVE = "val/dice_original"
PREVIEW_FILE = "val_preview.npz"
LOCK_FILE = ".lock"
HYDRA_DIR = ".hydra"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"

# Settings that do not change what a run computes (where it writes, how fast, what it logs);
# the devices enter as the number of processes (``processes``).
NOT_IDENTITY = (
    "hydra", "paths", "logger", "ckpt_path", "resume", "evaluate_best", "study", "report",
    "verbose",
    "data.dir", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.cache",
    "model.compile", "model.channels_last", "optimizer.fused",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.sync_batchnorm",
    "trainer.strategy", "trainer.default_root_dir", "trainer.log_every_n_steps",
    "trainer.enable_progress_bar", "trainer.benchmark", "trainer.num_sanity_val_steps",
    "trainer.profiler", "trainer.detect_anomaly",
    "callbacks.progress_bar", "callbacks.image_grid", "callbacks.lr_monitor",
    "callbacks.interrupt_checkpoint", "callbacks.finite_loss",
    "callbacks.epoch_log", "callbacks.model_checkpoint.dirpath",
    "callbacks.model_checkpoint.filename", "callbacks.model_checkpoint.save_top_k",
    "callbacks.model_checkpoint.auto_insert_metric_name",
    "callbacks.model_checkpoint.save_weights_only", "callbacks.last_checkpoint",
    "preprocessing", "split", "identity",
)
REPEAT_KEYS = ("seed", "data.fold")  # what tells the runs of one group apart
CODE_PREFIX = "code."  # the identity's entries of code_version()
WORLD_SIZE = "trainer.world_size"  # the identity's number of processes (see processes)


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


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True, timeout=30, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
                          ).stdout


@functools.cache
def code_version() -> dict[str, Any]:
    """The package version and, from a git checkout, its commit and a digest of uncommitted
    changes; read once per process, as the code is loaded."""
    code: dict[str, Any] = {"version": prostate_seg.__version__}
    root = Path(prostate_seg.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed package, not a checkout
        return code
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        diff = _git(root, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff")
    except (OSError, subprocess.SubprocessError):
        return code
    code.update(commit=commit, dirty=bool(diff))
    if diff:
        code["changes"] = hashlib.sha256(diff.encode()).hexdigest()[:12]
    return code


def describe_code(code: Mapping[str, Any]) -> str:
    """``0.1.0 commit 73910b3c0a1e``, ``... with uncommitted changes 5e0c2d9a41f7``."""
    if not code:
        return "unrecorded code"
    text = str(code.get("version"))
    if code.get("commit"):
        text += f" commit {str(code['commit'])[:12]}"
    if code.get("dirty"):
        text += f" with uncommitted changes {code.get('changes')}"
    return text


def mixed_code(identities: Iterable[Mapping[str, Any] | None]) -> str | None:
    """One line naming the code versions of runs made by different code, else None: pooling them
    would compare code as well as losses."""
    made_by = Counter(describe_code(identity.code if identity else {})
                      for identity in map(Identity.from_dict, identities))
    if len(made_by) < 2:
        return None
    return "runs made by different code: " + "; ".join(
        f"{n} by {version}" for version, n in made_by.most_common())


def group_across_code(identity: Mapping[str, Any] | None) -> str | None:
    """The run's group without the code: pools one configuration made by different code."""
    stored = Identity.from_dict(identity)
    if stored is None or not stored.config:
        return None
    return _digest({k: v for k, v in stored.config.items()
                    if k not in REPEAT_KEYS and not k.startswith(CODE_PREFIX)})


def processes(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """Processes a run trains on (devices x nodes; None: GPUs to count on a host that shows none)
    and whether they share BatchNorm statistics."""
    import torch  # not for the launchers' and the report's imports of this module

    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes") or 1
    if isinstance(devices, str) and "," in devices:  # "0,1": these GPUs
        devices = [d for d in devices.split(",") if d.strip()]
    try:
        if isinstance(devices, (list, tuple, ListConfig)):
            count: int | None = len(devices)
        elif str(devices).strip() in ("-1", "auto"):
            count = (1 if trainer.get("accelerator") == "cpu"
                     else torch.cuda.device_count() or None)
        else:
            count = int(devices)
        world = None if count is None else count * int(nodes)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.devices={devices}, trainer.num_nodes={nodes}: a number of "
                          "devices (-1 or auto: all visible), a list of GPU ids, and a number "
                          "of nodes") from None
    return {WORLD_SIZE: world,
            "trainer.sync_batchnorm": bool(trainer.get("sync_batchnorm")) and world != 1}


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

    @property
    def code(self) -> dict[str, Any]:
        """The code_version() the run was made with ({} when not recorded)."""
        return {k[len(CODE_PREFIX):]: v for k, v in self.config.items()
                if k.startswith(CODE_PREFIX)}

    def _entries(self) -> dict[str, Any]:
        entries = {k: v for k, v in self.config.items() if not k.startswith(CODE_PREFIX)}
        return {**entries, "code": describe_code(self.code)}

    def differences(self, other: Identity) -> list[str]:
        """``key: old -> new`` per differing setting (``other`` is the old one); a world size this
        machine cannot know (None) is taken to be the stored one."""
        new, old = self._entries(), other._entries()
        return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                for k in sorted(set(new) | set(old))
                if new.get(k, "(unset)") != old.get(k, "(unset)")
                and not (k == WORLD_SIZE and k in new and new[k] is None)]


def config_identity(cfg: DictConfig | Mapping[str, Any], dataset: str, split: str) -> Identity:
    """Identity from the config, the dataset fingerprint, the split, the code and the processes."""
    container = (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
                 else dict(cfg))
    values = {k: v for k, v in _flatten(container).items() if not _excluded(k, NOT_IDENTITY)}
    values.update({"data.content": dataset, "data.split": split,
                   **processes(container.get("trainer") or {}),
                   **{CODE_PREFIX + k: v for k, v in code_version().items()}})
    group = {k: v for k, v in values.items() if k not in REPEAT_KEYS}
    return Identity(_digest(values), _digest(group), values)


split_digest = _digest  # the split.json's hash, a part of the identity


def _stamp_holder(fd: int) -> None:
    """Who holds a lock, written into its file for the message of a process it refuses."""
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())


class RunLock:
    """Exclusive lock on a folder for the life of its process: the kernel releases it when the
    process dies, so a killed job leaves no stale lock."""

    def __init__(self, run_dir: Path, what: str = "run folder", stamp: bool = True):
        """``stamp=False``: the holder is written later (:meth:`stamp`), so a refused command leaves
        the file as it found it."""
        self.path = run_dir / LOCK_FILE
        self.what = what
        self.made = False  # whether this process created the lock file
        self._lock = FileLock(self.path, blocking=False, preserve_lock_file=True,
                              on_acquired=_stamp_holder if stamp else None)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.made = not self.path.exists()
        try:
            self._lock.acquire()
        except Timeout:
            raise ConfigError(f"{self.path.parent}: {self.what} in use by {self._holder()}; wait "
                              "for it to end, or write to another folder") from None

    def stamp(self) -> None:
        with open(self.path, "r+b") as f:
            _stamp_holder(f.fileno())

    def release_unused(self) -> None:
        """Release, removing the lock file if this process made it for nothing."""
        self.release()
        if self.made:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self._lock.release()

    def held_by_another(self) -> str | None:
        """Who holds the folder (``pid N on host``), or None; only looks, never writes."""
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


def claim(run_dir: Path, cfg: DictConfig, lock: RunLock) -> None:
    """From here the folder is this run's: the held log records, the lock's holder and .hydra/
    (the config is not written before: hydra.output_subdir: null) are written now."""
    from hydra.core.hydra_config import HydraConfig

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flushLevel = logging.NOTSET
            handler.flush()
    lock.stamp()
    hydra = HydraConfig.get()
    (run_dir / HYDRA_DIR).mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra})),
                       ("overrides.yaml", hydra.overrides.task)):
        write_text(run_dir / HYDRA_DIR / name, OmegaConf.to_yaml(node))


def check_run_folder(run_dir: Path) -> None:
    """A folder a run has claimed (.hydra/, written first) or left a status in, or one holding
    none of a run's files: a user's per_patient.csv in hydra.run.dir=. would be replaced."""
    if (run_dir / HYDRA_DIR).is_dir() or RunStatus(run_dir).state is not None:
        return
    for name in (STATUS_FILE, RESULTS_FILE, PER_PATIENT_FILE, PREVIEW_FILE, METRICS_DIR,
                 LAST_CHECKPOINT.parent.name):
        if (run_dir / name).exists():
            raise ConfigError(f"{run_dir / name}: not a run's (no {HYDRA_DIR}/ or run status "
                              "beside it); training in this folder would replace it: move it, "
                              "or choose another hydra.run.dir")


def forget_held_log() -> None:
    """A command refused before it claimed its folder drops the held log records."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.MemoryHandler) and \
                handler.flushLevel > logging.CRITICAL:
            with handler.lock:
                handler.buffer.clear()


def load_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(content, None), (None, None) when absent, or (None, why) when unusable or not an object."""
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
    """One row per epoch merged over the CSVLogger's rows and versions (a resumed epoch is the
    latest version's). Raises OSError, ValueError or csv.Error on an unreadable file."""
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
        """``resumed_from``: the checkpoint this start continues; one outside the folder (the
        user's ckpt_path) is kept as ``started_from`` through the run's own resumes, as its
        weights did not start from scratch."""
        own_last = self.path.parent / LAST_CHECKPOINT
        started_from = (self.record.get("started_from") if resumed_from is not None
                        and Path(resumed_from).resolve() == own_last.resolve() else resumed_from)
        self._write(status="running", started=time.time(), host=socket.gethostname(),
                    pid=os.getpid(), resumed_from=resumed_from, started_from=started_from,
                    error=None, traceback=None, code=identity.code, identity=identity.to_dict())

    def completed(self) -> None:
        self._write(status="completed", finished=time.time())

    def failed(self, exc: BaseException) -> None:
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        self._write(status="interrupted" if interrupted else "failed", finished=time.time(),
                    error=f"{type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)))


def late_gain(dice: Sequence[float]) -> float | None:
    """How much a run's selection Dice rose over its last quarter of epochs (at least 3, so
    more than a quarter under 12 epochs), at the pace of a least-squares line through them; None
    for fewer than two epochs. The pace at the end, not the last quarter against the one
    before: a run that rose through its third quarter and then stayed flat has converged
    (issue 24's recipe: +0.004 here, +0.034 by quarters)."""
    if len(dice) < 2:
        return None
    tail = max(len(dice) // 4, min(len(dice), 3))
    x = [k - (tail - 1) / 2 for k in range(tail)]
    slope = sum(a * b for a, b in zip(x, dice[-tail:])) / sum(a * a for a in x)
    return float(slope * tail)


def run_late_gain(run_dir: Path) -> float | None:
    """The run's late_gain, read off its selection curve and rounded as results.json keeps
    it; None with under two epochs scored."""
    dice = [h["select/dice"] for h in read_history(run_dir) if "select/dice" in h]
    gain = late_gain([d for d in dice if math.isfinite(d)])
    return None if gain is None else round(gain, 4)
