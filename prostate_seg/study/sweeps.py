"""Sweep jobs: their folder names.

A job folder is named after what tells it apart: the loss, the fold, the seed, then any other
swept setting (``tversky_a0.25-fold0-seed0``, ``bce-fold1-seed2-lr0.001``). The names keep to
characters Hydra's command-line parser accepts unquoted, so a checkpoint path from a sweep can
be pasted into ``ckpt_path=...`` as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

DEFAULT_BASELINE = "bce"  # the loss every other is compared with, when a sweep has it
ALWAYS_NAMED = ("loss", "data.fold", "seed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")


def _token(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return _UNSAFE.sub("_", text).strip("_") or "none"


def job_name(cfg: DictConfig, varying: Iterable[tuple[str, Any]]) -> str:
    """``<loss>-fold<k>-seed<s>`` plus one ``-<key><value>`` per other varying setting (a group
    choice such as ``model=unet_small`` adds its value; a loss setting already spelled in the
    loss name, like alpha in ``tversky_a0.25``, adds nothing)."""
    loss = _token(OmegaConf.select(cfg, "loss.name", default="loss"))
    parts = [f"{loss}-fold{OmegaConf.select(cfg, 'data.fold')}-seed{cfg.get('seed')}"]
    varying = [(k, v) for k, v in varying if k not in ALWAYS_NAMED]
    short = [k.rsplit(".", 1)[-1] for k, _ in varying]
    for (key, value), last in zip(varying, short):
        value = _token(value)
        if key.startswith("loss.") and value in loss:
            continue
        label = "" if "." not in key else (last if short.count(last) == 1 else key)
        parts.append(f"{label}{value}")
    return "-".join(parts)


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """(key, value) of command-line overrides as Hydra parses them (``1e-3`` is 0.001),
    deletions left out."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [(o.key_or_group, o.value()) for o in parsed if not o.is_delete()]


def task_overrides(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(key, value) of the job's command-line overrides, minus the keys Hydra is told to keep
    out of folder names (``hydra.job.config.override_dirname.exclude_keys``)."""
    excluded = set(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys",
                                    default=[]) or [])
    return [(key, value) for key, value in parse_overrides(
        OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []) if key not in excluded]


def job_name_resolver(*, _root_: DictConfig) -> str:
    """``${ps.job_name:}``, the default ``hydra.sweep.subdir``: a name from every override of the
    job. The project's sweeper, which sees the whole grid, names a job by its swept settings
    only (the same ``job_name`` of the same ``task_overrides``)."""
    return job_name(_root_, task_overrides(_root_))
