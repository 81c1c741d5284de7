"""Shared entry point of the command-line tools: Hydra config, one-line errors, exit codes.

Every tool (train, evaluate, predict, prepare, synthetic) runs through :func:`hydra_entry`:
  * config-group choices on the command line (``loss=foo``) are checked first, so a typo
    gives one line listing the valid names instead of Hydra's multi-line report;
  * a :class:`~prostate_seg.errors.UserError` raised by the tool, and an ``OSError`` (disk
    full, read-only, not a directory, name too long, no permission), print ``error: ...`` on
    one line naming the file and exit with status 2; the full traceback goes to the run's log
    file only.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig

import prostate_seg.config  # noqa: F401  (registers the ps.* resolvers)
from prostate_seg.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_MODULE = "prostate_seg.conf"


def _config_location() -> tuple[Path, str]:
    """(folder, Hydra config path) of the configs: ``conf/`` beside the package in a checkout
    (also when installed editable), else the copy that a wheel ships inside the package,
    which Hydra reads as ``pkg://prostate_seg.conf``."""
    checkout = PACKAGE_DIR.parent / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout, str(checkout)
    return PACKAGE_DIR / "conf", f"pkg://{CONFIG_MODULE}"


CONF_DIR, CONFIG_PATH = _config_location()
EXIT_USER_ERROR = 2
# Hydra flags that consume the next argument when written without "=".
_FLAGS_WITH_VALUE = {"-cp", "-cn", "-cd", "-c", "-p", "--config-path", "--config-name",
                     "--config-dir", "--cfg", "--package", "--experimental-rerun"}

log = logging.getLogger(__name__)


def initialize_configs() -> Any:
    """Hydra's compose API over the project's configs (a context manager)."""
    if CONFIG_PATH.startswith("pkg://"):
        return hydra.initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
    return hydra.initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")


def command_line_overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` arguments of a Hydra command line (flags and their values dropped)."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides


def unknown_group_choice(argv: list[str]) -> str | None:
    """A one-line message for the first ``group=option`` whose option does not exist."""
    overrides = command_line_overrides(argv)
    if not overrides:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        return f"cannot parse the command line: {str(exc).splitlines()[0]}"
    GlobalHydra.instance().clear()
    with initialize_configs():
        loader = GlobalHydra.instance().config_loader()
        for override in parsed:
            group = override.key_or_group
            if override.is_delete() or "." in group:
                continue
            options = loader.get_group_options(group)
            if not options:
                continue  # a plain value such as seed=1, not a config group
            if override.is_choice_sweep():
                values = list(override.sweep_string_iterator())
            elif override.is_sweep_override():
                continue  # glob() / range(): Hydra expands and checks these itself
            else:
                values = [override.value()]
            for value in values:
                if value is not None and str(value) not in options and str(value) != "null":
                    name = group.split("/")[-1]
                    return (f"{group}={value}: unknown {name}; valid: {', '.join(sorted(options))}")
    GlobalHydra.instance().clear()
    return None


def _log_traceback_to_files() -> None:
    text = traceback.format_exc()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(text)
            handler.flush()


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


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Errors that escape Hydra (a run folder or log file it cannot create, a failed job of an
    in-process sweep) are also one line with exit code 2. Hydra passes exceptions on instead of
    printing them only with HYDRA_FULL_ERROR set; bugs then show their full traceback."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - bugs are re-raised below
        line = error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _run(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    try:
        return task(cfg)
    except (UserError, OSError) as exc:
        _log_traceback_to_files()
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher records the failed job and the sweep goes on
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def hydra_entry(task: Callable[[DictConfig], Any], config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over ``<config_name>.yaml`` of the project's configs."""
    problem = unknown_group_choice(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        return _run(task, cfg)

    with one_line_errors():
        _main()
