"""The command-line layer: ``python -m prostate_seg COMMAND [overrides]``, the console scripts
(``prostate-seg-train`` ...) and the checkout's ``train.py``, ``evaluate.py``, ``predict.py``.

Every Hydra tool (train, evaluate, predict, prepare, synthetic) runs through :func:`hydra_entry`:
  * Hydra composes the config once; what it refuses, before any folder is made, becomes one
    line built from its own exception: a group choice that does not exist (``loss=focal``)
    lists the valid ones, a key that does not exist (``loss.alpa``) names the closest valid
    keys. A required value that is missing (``ckpt_path``) is named before the task starts;
  * a :class:`~prostate_seg.errors.UserError` raised by the tool, and an ``OSError`` (disk
    full, read-only, not a directory, name too long, no permission), print ``error: ...`` on
    one line naming the file and exit with status 2. A single command that stops so, before
    it wrote anything of its own, leaves no output folder behind; ``HYDRA_FULL_ERROR=1``
    shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.utils import get_args_parser  # what hydra.main reads sys.argv with
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from prostate_seg.config import CONFIG_PATH, initialize_configs, openmp_yields
from prostate_seg.errors import ConfigError, UserError
from prostate_seg.settings import check_settings

EXIT_USER_ERROR = 2

log = logging.getLogger(__name__)


def _hydra_args(argv: list[str]) -> argparse.Namespace:
    """A command line as Hydra's own parser reads it (flags, ``args.overrides``)."""
    return get_args_parser().parse_args(argv)


def is_command_line_error(exc: BaseException) -> bool:
    """Whether Hydra stopped on the command line or the configs it names (an unknown key or
    group option, an override it cannot parse, a flag it refuses) rather than in the task."""
    if isinstance(exc, (ConfigCompositionException, OverrideParseException, SearchPathException)):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, ValueError) and bool(frames) and Path(
        frames[-1].filename).is_relative_to(Path(hydra.__file__).parent)


@contextmanager
def _config_loader() -> Iterator[Any]:
    """Hydra's config loader over the project's configs, outside a Hydra app."""
    GlobalHydra.instance().clear()
    try:
        with initialize_configs():
            yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().clear()


def _compose(config_name: str, overrides: list[str], multirun: bool) -> DictConfig:
    """The config Hydra composes first for this command line: the run's, or a sweep's own
    (swept values left out)."""
    with _config_loader() as loader:
        return loader.load_configuration(
            config_name, overrides, RunMode.MULTIRUN if multirun else RunMode.RUN)


def config_problem(config_name: str, argv: list[str]) -> str | None:
    """The one line ``python <tool> *argv`` stops with because Hydra cannot compose its config,
    or (a run) a required value is missing; None when there is none. Nothing is run."""
    args = _hydra_args(argv)
    try:
        cfg = _compose(args.config_name or config_name, args.overrides, args.multirun)
    except Exception as exc:  # noqa: BLE001 - what is not the command line's is re-raised
        if not is_command_line_error(exc):
            raise
        return hydra_error_line(exc, config_name, argv)
    printing = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    if args.multirun or printing:
        return None
    return required_values_problem(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def hydra_error_line(exc: BaseException, config_name: str, argv: list[str]) -> str:
    """One line for Hydra's error ``exc`` on ``python <tool> *argv``: an unknown group option
    lists the valid ones, an unknown key names the closest ones (from the config composed
    without it, on this error path only)."""
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the command line: {_message(exc)}"
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.rpartition("/")
        return _unknown_option(group, value, exc.options)
    args = _hydra_args(argv)
    key = _unknown_key(exc)
    if key is not None:
        return unknown_key_line(key, _composed_without(config_name, args, key))
    null_group = _null_group_choice(args) if isinstance(exc, ValueError) else None
    if null_group:
        return null_group
    cause = exc.__cause__
    return _message(exc) + (f": {_message(cause).split('; ')[0]}" if isinstance(
        cause, OmegaConfBaseException) else "")


def _message(exc: BaseException) -> str:
    """Hydra's message on one line, without the config search path it may list."""
    text = str(exc).split("Config search path:")[0]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(
        exc).__name__


def _unknown_option(group: str, value: str, options: list[str]) -> str:
    return (f"{group}={value}: unknown {group.split('/')[-1]}; valid: "
            f"{', '.join(sorted(options))} (~{group} leaves it out)")


def _unknown_key(exc: BaseException) -> str | None:
    """The key Hydra's error says does not exist (set, or deleted with ``~``), if it says so."""
    if isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        return exc.__cause__.full_key
    deleted = re.fullmatch(r"Could not delete from config\. '(.+)' does not exist\.", str(exc))
    return deleted.group(1) if deleted else None


def _composed_without(config_name: str, args: argparse.Namespace, key: str) -> list[DictConfig]:
    """The command's config composed without the override of ``key`` (nor of other keys that
    do not exist); none when it names another config folder or fails otherwise."""
    if args.config_path or args.config_dir:
        return []
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    left_out = {key}
    while True:
        try:
            return [_compose(args.config_name or config_name,
                             [o.input_line for o in parsed if o.key_or_group not in left_out],
                             args.multirun)]
        except Exception as exc:  # noqa: BLE001 - then there is no suggestion, just the error
            other = _unknown_key(exc)
            if other is None or other in left_out:
                return []
            left_out.add(other)


def unknown_key_line(key: str, configs: list[DictConfig]) -> str:
    """``loss.alpa: no such key; did you mean loss.alpha?``, from the keys of ``configs`` (the
    command's own, composed without ``key``)."""
    known = sorted({k for cfg in configs
                    for k, _ in _flat_items(OmegaConf.to_container(cfg, resolve=False))
                    if k.startswith("hydra.") == key.startswith("hydra.")})
    return f"{key}: no such key" + (f"; {_closest_keys(key, known)}" if known else "")


def _null_group_choice(args: argparse.Namespace) -> str | None:
    """``scheduler=null``: Hydra says only that a group choice may not be null."""
    with _config_loader() as loader:
        for override in OverridesParser.create().parse_overrides(args.overrides):
            options = loader.get_group_options(override.key_or_group)
            if override.value() is None and not override.is_delete() and options:
                return _unknown_option(override.key_or_group, "null", options)
    return None


def _flat_items(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every node and leaf of a config's container (mappings only, not
    list items)."""
    if not isinstance(node, dict):
        return []
    items = []
    for name, child in node.items():
        items.append((f"{prefix}{name}", child))
        items += _flat_items(child, f"{prefix}{name}.")
    return items


def _nearest(word: str, candidates: set[str] | list[str], cutoff: float) -> list[str]:
    """The candidates most like ``word`` (difflib's ratio at least ``cutoff``, and within 0.05
    of the best one), best first, at most three."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates),
                    reverse=True)
    if not scored or scored[0][0] < cutoff:
        return []
    return [c for ratio, c in scored[:3] if ratio >= max(cutoff, scored[0][0] - 0.05)]


def _closest_keys(key: str, known: list[str]) -> str:
    """``did you mean loss.alpha?`` from the whole key, else from its last part (``lr`` ->
    ``optimizer.lr``); else what the nearest existing parent holds."""
    parts = key.split(".")
    parents = {".".join(parts[:i]) for i in range(1, len(parts))}
    matches = _nearest(key, [k for k in known if k not in parents], cutoff=0.6)
    if not matches:
        leaves = _nearest(parts[-1], {k.rsplit(".", 1)[-1] for k in known}, cutoff=0.75)
        matches = sorted((k for k in known if k.rsplit(".", 1)[-1] in leaves), key=len)[:3]
    if matches:
        return f"did you mean {' or '.join(matches)}?"
    parent = next((p for p in sorted(parents, key=len, reverse=True) if p in known), "")
    children = sorted(k.rsplit(".", 1)[-1] for k in known
                      if k.rsplit(".", 1)[0] == parent and k != parent) if parent else \
        sorted(k for k in known if "." not in k)
    return f"{parent or 'the config'} has: {', '.join(children)}"


def required_values_problem(cfg: DictConfig) -> str | None:
    """``ckpt_path: required, not given (...)`` for the values a config leaves ``???`` (found
    without resolving the others, which may take seconds); Hydra's own node is not the user's."""
    missing = [key for key, value in _flat_items(OmegaConf.to_container(cfg, resolve=False))
               if value == "???" and not key.startswith("hydra.")]
    if not missing:
        return None
    example = " ".join(f"{key}=..." for key in missing)
    return f"{', '.join(missing)}: required, not given (add {example} to the command line)"


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Outside a job (e.g. a sweeper's checks before launch): a UserError becomes one line on
    stderr and exit status 2, as in a job."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def os_error_line(exc: OSError) -> str:
    """``PATH: reason (ENOSPC)``: the file and what the system said, on one line."""
    if exc.filename is None:  # e.g. re-raised from a loader worker: the last line is the error
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    code = errno.errorcode.get(exc.errno or 0)
    return f"{where}: {exc.strerror or exc}" + (f" ({code})" if code else "")


def error_line(exc: BaseException) -> str | None:
    """The one line shown for an error that is the user's or the machine's to fix (a
    UserError, or an OSError such as a full, read-only or missing disk, also as the stated
    cause of another error); None for anything else, which is a bug and keeps its traceback."""
    while exc is not None:
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, OSError):
            return os_error_line(exc)
        exc = exc.__cause__
    return None


# Whether the user asked for tracebacks, as recorded by the outermost tool (one_line_errors).
TRACEBACKS = "PROSTATE_SEG_FULL_ERROR"


@contextmanager
def one_line_errors(show_traceback: bool = False, config_name: str | None = None
                    ) -> Iterator[None]:
    """Errors that escape Hydra (a command line it cannot compose ``config_name`` from, a run
    folder or log file it cannot create, a failed job of an in-process sweep) are also one line
    with exit code 2. Hydra passes exceptions on instead of printing them only with
    HYDRA_FULL_ERROR set; bugs, and every error with ``show_traceback``, then show their full
    traceback."""
    saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", TRACEBACKS)}
    # The user's own choice, for the jobs this process starts (gpu_pool, SLURM): they inherit
    # the HYDRA_FULL_ERROR=1 set below, which the user did not ask for.
    os.environ.setdefault(TRACEBACKS, "1" if saved["HYDRA_FULL_ERROR"] == "1" else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - bugs are re-raised below
        line = (hydra_error_line(exc, config_name, sys.argv[1:])
                if config_name and is_command_line_error(exc) else error_line(exc))
        if line is None or show_traceback:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tracebacks_wanted() -> bool:
    """Did the user ask for full tracebacks (HYDRA_FULL_ERROR=1)? In a job started by a tool
    of this project, the answer that tool recorded, not the variable it set for Hydra."""
    return os.environ.get(TRACEBACKS, os.environ.get("HYDRA_FULL_ERROR")) == "1"


def remove_bookkeeping_folder(run_dir: Path, log_name: str) -> bool:
    """Remove ``run_dir`` when it holds nothing or only the command's log (which repeated the
    console; a training run's log is only written once it claimed the folder), then its
    parents that this leaves empty, up to the working directory: a command that stopped before
    its own work leaves no folder. A folder holding anything else is kept whole."""
    try:
        entries = list(run_dir.iterdir())
        if any(e.name != log_name or not e.is_file() or e.is_symlink() for e in entries):
            return False
        for entry in entries:
            entry.unlink()
        run_dir.rmdir()
    except OSError:
        return False  # tidying up is a courtesy; the error line is what matters
    cwd = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if cwd not in parent.parents:
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
    return True


def _run(task: Callable[[DictConfig], Any], cfg: DictConfig, show_traceback: bool = False,
         command: str = "train") -> Any:
    try:
        missing = required_values_problem(cfg)
        if missing:
            raise ConfigError(missing)
        check_settings(cfg, command)
        return task(cfg)
    except (UserError, OSError) as exc:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher records the failed job and the sweep goes on
        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            remove_bookkeeping_folder(Path(hydra_cfg.runtime.output_dir),
                                      f"{hydra_cfg.job.name}.log")
        if show_traceback:
            raise
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class QuietConsole(logging.Filter):
    """The console's filter (conf/hydra/job_logging/quiet.yaml): Lightning's banners, tips and
    model table, Hydra's launcher listing and the warnings known to be harmless stay in the log
    file only; ``verbose=true`` shows them."""

    NOISY = ("pytorch_lightning", "lightning", "lightning_fabric",
             "hydra._internal.core_plugins.basic_launcher")
    HARMLESS = ("does not have many workers", "GPU available but not used", "srun",
                "is smaller than the logging interval", "exists and is not empty",
                "was called without a model", "there is no last checkpoint available",
                "is deprecated", "ckpt_path", "The number of training batches",
                "Consider setting `persistent_workers", "LeafSpec")

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name == "py.warnings":
            return not any(text in record.getMessage() for text in self.HARMLESS)
        return record.levelno >= logging.WARNING or not record.name.startswith(self.NOISY)


def hydra_entry(task: Callable[[DictConfig], Any], config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over ``<config_name>.yaml`` of the project's configs.
    ``HYDRA_FULL_ERROR=1`` shows the traceback of every error (Hydra's own switch)."""
    show_traceback = tracebacks_wanted()
    logging.captureWarnings(True)  # warnings go to the log file; the console keeps the useful
    openmp_yields()  # before any task imports torch

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        return _run(task, cfg, show_traceback, config_name)

    with one_line_errors(show_traceback, config_name):
        _main()


def _task(module: str, name: str) -> Callable[[DictConfig], Any]:
    """``module.name``, imported when the task runs: ``--help`` and a typo answer before the
    heavy imports (torch, Lightning) of the stage."""
    def task(cfg: DictConfig) -> Any:
        return getattr(importlib.import_module(module), name)(cfg)
    return task


def _train(cfg: DictConfig) -> Any:
    """A bad tracking store or missing data folder is named before torch and Lightning load."""
    from prostate_seg.training.checks import check_data_dir, check_tracking_uri

    check_tracking_uri(cfg)
    check_data_dir(cfg.data.dir)
    from prostate_seg.training.fit import train as fit

    return fit(cfg)


def train() -> None:
    hydra_entry(_train, config_name="train")


def evaluate() -> None:
    hydra_entry(_task("prostate_seg.inference.evaluate", "run"), config_name="evaluate")


def predict() -> None:
    hydra_entry(_task("prostate_seg.inference.predict", "run"), config_name="predict")


def prepare() -> None:
    hydra_entry(_task("prostate_seg.data.prepare", "run"), config_name="prepare")


def synthetic() -> None:
    hydra_entry(_task("prostate_seg.data.synthetic", "run"), config_name="synthetic")


def report() -> None:
    from prostate_seg.study.report import main as report_main

    sys.exit(report_main())


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict, "prepare": prepare,
            "synthetic": synthetic, "report": report}


def main() -> None:
    """``python -m prostate_seg COMMAND ...``: the command's own arguments follow it."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 else ""
        print(f"error: {given}usage: python -m prostate_seg {{{','.join(COMMANDS)}}} [...]",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    command = sys.argv.pop(1)
    COMMANDS[command]()
