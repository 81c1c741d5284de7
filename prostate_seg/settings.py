"""What each command's values must be, checked before any file is read or torch imported: a
string where a number belongs (``image_size=abc``), a list where one value belongs, one patient
where a list belongs would otherwise end in a traceback, or run with another value."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError

from prostate_seg.errors import ConfigError


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
    nullable: bool = False  # null is allowed and not shown (alpha of a loss without one)

    def allows(self, value: object, high: float | None) -> bool:
        if value is None and self.nullable:
            return True
        types = numbers.Integral if self.kind is int else numbers.Real  # numpy's too
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


@dataclass(frozen=True)
class ListOf:
    """A list of ``length`` items (a (min, max) pair), each a ``Setting`` or a string (``str``);
    ``example`` shows the form in the error line."""

    item: Setting | type
    length: tuple[int, int | None]
    example: str
    nullable: bool = False

    def allows(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        low, high = self.length
        if len(value) < low or (high is not None and len(value) > high):
            return False
        if self.item is str:
            return all(isinstance(v, str) for v in value)
        return all(self.item.allows(v, self.item.high) for v in value)

    def describe(self) -> str:
        low, high = self.length
        count = (f"{low}" if low == high else f"{low} or more" if high is None
                 else f"{low} to {high}")
        each = "" if self.item is str else self.item.describe(self.item.high)
        kind = f"numbers, each {each}" if each else "names"
        return (f"a list of {count} {kind}, e.g. {self.example}"
                + (" (or null)" if self.nullable else ""))


@dataclass(frozen=True)
class PathName:
    """A file or folder name: a non-empty string (Hydra reads ``5``, ``[a]`` and ``null`` as
    other types, which would end in a traceback where a path is used)."""

    nullable: bool = False

    def allows(self, value: object) -> bool:
        return (value is None and self.nullable) or (isinstance(value, str) and bool(value.strip()))

    def describe(self, key: str) -> str:
        return (f"a path{' or null' if self.nullable else ''} (a name Hydra would read as a "
                f"number, list or null goes in quotes: \"{key}='5'\")")


SEED = Setting(int, 0, 2**32 - 1)  # numpy's and Lightning's range (Lightning replaces others by 0)
WORKERS = Setting(int, 0)  # 0: in this process
BATCH = Setting(int, 1)
PROBABILITY = Setting(float, 0.0, 1.0)
# The numbers of this project's losses (prostate_seg.losses): the classes check their arguments
# with them, train's start-up check a config's, naming a combined loss's term. Another library's
# loss may mean otherwise by them (a focal loss's gamma = 0 is BCE).
LOSS_NUMBERS = {"alpha": Setting(float, 0.0, 1.0, nullable=True),  # weighs false positives
                "beta": Setting(float, 0.0, 1.0, nullable=True),  # weighs false negatives
                "smooth": Setting(float, 0.0),
                "gamma": Setting(float, 0.0, open_low=True),
                # a combined loss's weights: a negative one ascends its term
                "weights": Setting(float, 0.0)}
MAX_SIDE = 4096  # pixels a side of a phantom or a prepared slice: beyond it, hours of huge PNGs
# Per command (its config's name): keys absent from a config (a removed callback) are skipped.
SETTINGS: dict[str, dict[str, Setting | ListOf | PathName]] = {
    "train": {
        "data.dir": PathName(),
        "paths.output_root": PathName(),
        "ckpt_path": PathName(nullable=True),
        "seed": SEED,
        "data.split_seed": SEED,
        "data.batch_size": BATCH,
        "data.num_workers": Setting(int, 0),
        # 2k + 1 channels: OpenCV's lookup tables (Normalize) take at most 128
        "data.context_slices": Setting(int, 0, 63),
        "data.folds": Setting(int, 2),
        "data.fold": Setting(int, 0, "data.folds", open_high=True),
        "data.test_fraction": Setting(float, 0.0, 1.0, open_high=True),
        # any loss's, before the run's folder is made (check_loss_numbers: this project's)
        "loss.alpha": LOSS_NUMBERS["alpha"],
        "loss.beta": LOSS_NUMBERS["beta"],
        "data.test_patients": ListOf(str, (1, None), "[Case00, Case07]", nullable=True),
        # the training patients that choose epoch and checkpoint
        "data.select_fraction": Setting(float, 0.0, 1.0, open_low=True, open_high=True),
        "augment.scale": ListOf(Setting(float, 0.0, open_low=True), (2, 2), "[0.7, 1.4]"),
        "augment.scale_p": PROBABILITY,
        "augment.intensity_p": PROBABILITY,
        "augment.blur_p": PROBABILITY,
        "model.net.features": ListOf(Setting(int, 1), (2, None), "[32, 64, 128, 256]"),
        "optimizer.lr": Setting(float, 0.0, open_low=True),
        "optimizer.weight_decay": Setting(float, 0.0),
        # the schedules' floors and exponent: torch takes a negative one and ascends, or
        # divides by zero epochs later
        "scheduler.eta_min": Setting(float, 0.0),
        "scheduler.min_lr": Setting(float, 0.0),
        "scheduler.power": Setting(float, 0.0),
        "scheduler.patience": Setting(int, 0),
        "trainer.max_epochs": Setting(int, 1, also=(-1,)),
        "trainer.min_epochs": Setting(int, 0),
        "trainer.log_every_n_steps": Setting(int, 1),
        # what Lightning's Trainer takes at start and finds wrong only in fit, or never
        "trainer.max_steps": Setting(int, 1, also=(-1,)),
        "trainer.min_steps": Setting(int, 0, nullable=True),
        "trainer.num_sanity_val_steps": Setting(int, 0, also=(-1,), nullable=True),
        "trainer.check_val_every_n_epoch": Setting(int, 1, nullable=True),
        "trainer.accumulate_grad_batches": Setting(int, 1),
        # every epoch is scored on the selection patients (checkpoint, early stopping, schedule);
        # 0 trains or scores nothing, and Lightning finds out inside fit
        "trainer.limit_train_batches": Setting(float, 0.0, open_low=True),
        "trainer.limit_val_batches": Setting(float, 0.0, open_low=True),
        "trainer.gradient_clip_val": Setting(float, 0.0, nullable=True),  # < 0 reverses steps
        "callbacks.early_stopping.patience": Setting(int, 0),
        "callbacks.early_stopping.min_delta": Setting(float, 0.0),
        "callbacks.finite_loss.check_every_n_steps": Setting(int, 1),
        "callbacks.image_grid.num_images": Setting(int, 1),
        "callbacks.image_grid.min_size": Setting(int, 1),
        "callbacks.image_grid.per_row": Setting(int, 1),
        "callbacks.progress_bar.refresh_rate": Setting(int, 0),
        "callbacks.model_summary.max_depth": Setting(int, 0, also=(-1,)),
        "callbacks.weight_averaging.decay": Setting(float, 0.0, 1.0, open_high=True),
    },
    "prepare": {
        "input_dir": PathName(),
        "output_dir": PathName(),
        "image_size": Setting(int, 8, MAX_SIDE),
        "window": ListOf(Setting(float, 0.0, 100.0), (2, 2), "[0.5, 99.5]"),
        "mask_labels": ListOf(Setting(int, 1), (1, None), "[1, 2]", nullable=True),
        "image_channel": Setting(int, 0),
        "workers": WORKERS,
    },
    "synthetic": {"output_dir": PathName(), "num_patients": Setting(int, 1), "seed": SEED,
                  "size": Setting(int, 32, MAX_SIDE), "workers": WORKERS},
    "predict": {"ckpt_path": PathName(), "input": PathName(), "output": PathName(),
                "batch_size": BATCH},
    "evaluate": {"ckpt_path": PathName(), "output": PathName(nullable=True),
                 "data.dir": PathName(nullable=True), "batch_size": BATCH},
}
# What a tool writes: two jobs of its sweep must not write the same (null: a name it derives).
OUTPUTS: dict[str, str] = {"synthetic": "output_dir", "prepare": "output_dir",
                           "predict": "output", "evaluate": "output"}
# Yes/no switches: a string such as resume=no would count as true.
SWITCHES: dict[str, tuple[str, ...]] = {
    "train": ("resume", "evaluate_best", "data.cache", "verbose", "report.all_pairs",
              "report.allow_mixed_code"),
    "prepare": ("overwrite",),
    "synthetic": ("overwrite",),
    "predict": ("save_probabilities", "tta", "largest_component", "overwrite", "skip_existing"),
    "evaluate": ("tta", "largest_component", "overwrite"),
}
# What a command runs without, left out with ~KEY (``PREFIX.*``: a key directly under PREFIX,
# never Hydra's ``_target_``, ``_partial_``... nor one of NEEDED; Hydra's own ``hydra.``
# settings are Hydra's): it reads every other key or group it has, and would stop halfway
# without it.
REMOVABLE: dict[str, tuple[str, ...]] = {"train": ("callbacks", "callbacks.*", "scheduler",
                                                   "scheduler.*", "optimizer.*", "trainer.*")}
NEEDED: dict[str, tuple[str, ...]] = {"train": ("trainer.accelerator",)}  # read by train itself
ABSENT = object()  # OmegaConf.select's default: the key is not in the config


def removable(command: str, key: str) -> bool:
    """Whether ``command`` runs with ``~key`` on its command line."""
    if key.startswith("hydra."):
        return True
    prefix, _, last = key.rpartition(".")
    return key in REMOVABLE.get(command, ()) or (
        f"{prefix}.*" in REMOVABLE.get(command, ()) and not last.startswith("_")
        and key not in NEEDED.get(command, ()))


def check_settings(cfg: DictConfig, command: str) -> None:
    """Every present key of the command's ``SETTINGS`` and ``SWITCHES`` has a right value; then
    every ``${key}`` the config refers to exists (``~augment`` removes what data refers to),
    found by resolving the config, which reads prepare.json through its resolvers."""
    try:
        check_values_in(cfg, command)
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                               resolve=True)
    except InterpolationKeyError as exc:
        raise ConfigError(missing_reference(exc)) from None
    except InterpolationResolutionError as exc:  # ${oc.env:UNSET}, ${a} in a, a resolver's error
        raise ConfigError(f"{exc.full_key}: {str(exc).splitlines()[0]}") from None


def check_values_in(cfg: DictConfig, command: str) -> None:
    """The ``SETTINGS`` and ``SWITCHES`` part of check_settings: the values alone, which the
    command line checks before Hydra makes a folder."""
    for key, setting in SETTINGS.get(command, {}).items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is ABSENT:
            continue
        if isinstance(setting, (ListOf, PathName)):
            if not setting.allows(value):
                text = (setting.describe(key) if isinstance(setting, PathName)
                        else setting.describe())
                raise ConfigError(f"{key}={shown(value)}: must be {text}")
            continue
        high = setting.high
        if isinstance(high, str):
            high = OmegaConf.select(cfg, high, default=None)
            if not isinstance(high, (int, float)) or isinstance(high, bool):
                continue  # the bound is wrong itself and named by its own entry
        if not setting.allows(value, high):
            sweep = (f" (a sweep over values: -m {key}={','.join(map(shown, value))})"
                     if command == "train" and isinstance(value, ListConfig) and len(value)
                     and all(setting.allows(v, high) for v in value) else "")
            raise ConfigError(f"{key}={shown(value)}: must be {setting.describe(high)}{sweep}")
    for key in SWITCHES.get(command, ()):
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and not isinstance(value, bool):
            raise ConfigError(f"{key}={shown(value)}: must be true or false")


def check_values(command: str, **values: object) -> None:
    """The command line's rules (SETTINGS, SWITCHES) for the same values given to a Python
    function (synthetic.generate, prepare's settings)."""
    check_settings(OmegaConf.create({key: str(value) if isinstance(value, PurePath) else value
                                     for key, value in values.items()}), command)


def tversky_beta(alpha: float, beta: float | None) -> float:
    """A Tversky loss's beta: as given, or ``1 - alpha`` (the index is then an F-score)."""
    return 1.0 - alpha if beta is None else beta


def normalised(alpha: float, beta: float) -> bool:
    """Whether alpha + beta = 1, as written on a command line (0.65 + 0.35 in floats)."""
    return math.isclose(float(alpha) + float(beta), 1.0, abs_tol=1e-9)


def check_loss_numbers(loss: Mapping[str, Any], prefix: str = "loss") -> None:
    """``loss``'s numbers of LOSS_NUMBERS in range, named ``{prefix}.{key}``; a combined loss's
    weights also not all 0 (a zero loss trains nothing)."""
    weights = loss.get("weights") or {}
    values = {key: loss[key] for key in LOSS_NUMBERS if key != "weights" and key in loss}
    for key, value in [*values.items(), *((f"weights.{k}", w) for k, w in weights.items())]:
        setting = LOSS_NUMBERS[key.partition(".")[0]]
        if not setting.allows(value, setting.high):
            raise ConfigError(f"{prefix}.{key}={shown(value)}: must be "
                              f"{setting.describe(setting.high)}")
    if weights and not any(w > 0 for w in weights.values()):
        raise ConfigError(f"{prefix}.weights={shown(weights)}: at least one must be > 0 (all 0: "
                          "a zero loss, nothing learnt)")


def missing_reference(exc: InterpolationKeyError) -> str:
    """``data.x: refers to augment.scale, which the config lacks (...)`` from OmegaConf's
    message."""
    where = f"{exc.full_key}: " if exc.full_key else ""
    return (f"{where}refers to {referred(exc)}, which the config lacks (a group or key it needs "
            "left out?)")


def referred(exc: InterpolationKeyError) -> str:
    """The key an interpolation refers to and the config lacks."""
    found = re.search(r"Interpolation key '(.+?)' not found", str(exc))
    return found.group(1) if found else str(exc).splitlines()[0]


def shown(value: object) -> str:
    """A value as typed on the command line (``null``, ``true``, ``[1, 2]``), not Python's."""
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(shown(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k}: {shown(v)}' for k, v in value.items())}}}"
    if isinstance(value, str) and _reads_as_other_type(value):
        return f"'{value}'"  # typed in quotes (seed='7'): shown so, not as the number
    return str(value)


def _reads_as_other_type(text: str) -> bool:
    if text.strip().lower() in ("null", "true", "false", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True
