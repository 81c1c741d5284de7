"""The command-line layer: ``python -m prostate_seg COMMAND [overrides]``, the console scripts
(``prostate-seg-train`` ...) and the checkout's ``train.py``, ``evaluate.py``, ``predict.py``.

Every Hydra tool (train, evaluate, predict, prepare, synthetic) runs through :func:`hydra_entry`:
  * the command line is checked against the configs first, so a mistake is one line before
    any folder is made: a group choice that does not exist (``loss=focal``) lists the valid
    ones, a key that does not exist (``loss.alpa``) names the closest valid keys, a required
    value that is missing (``ckpt_path``) is named;
  * a :class:`~prostate_seg.errors.UserError` raised by the tool, and an ``OSError`` (disk
    full, read-only, not a directory, name too long, no permission), print ``error: ...`` on
    one line naming the file and exit with status 2. A single command that stops so, before
    it wrote anything of its own, leaves no output folder behind; ``HYDRA_FULL_ERROR=1``
    shows the traceback.
"""

from __future__ import annotations

import difflib
import importlib
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
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prostate_seg.config import CONFIG_PATH, initialize_configs
from prostate_seg.errors import UserError
from prostate_seg.study.runs import LOCK_FILE

EXIT_USER_ERROR = 2
# Hydra flags that consume the next argument when written without "=".
_FLAGS_WITH_VALUE = {"-cp", "-cn", "-cd", "-c", "-p", "--config-path", "--config-name",
                     "--config-dir", "--cfg", "--package", "--experimental-rerun"}
# Flags after which Hydra only prints (help, the config), and flags that name another config.
_PRINTING_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i",
                   "--shell-completion", "-sc"}
_OTHER_CONFIG_FLAGS = {"-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir"}

log = logging.getLogger(__name__)


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


def command_line_problem(argv: list[str], config_name: str) -> str | None:
    """One line for the first mistake on a command line, found before Hydra makes any folder:
    a group option that does not exist, a key that does not exist (with the closest valid
    keys), or a required value (``???``) not given. None when there is none."""
    flags = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    try:
        parsed = OverridesParser.create().parse_overrides(command_line_overrides(argv))
    except HydraException as exc:
        return f"cannot parse the command line: {str(exc).splitlines()[0]}"
    if flags & _OTHER_CONFIG_FLAGS:
        return None  # not this tool's config: Hydra checks it
    GlobalHydra.instance().clear()
    try:
        with initialize_configs():
            loader = GlobalHydra.instance().config_loader()
            groups = [o for o in parsed if _is_group(o.key_or_group, loader)]
            problem = _unknown_group_choice(groups, loader)
            if problem or any(o.is_sweep_override() and not o.is_choice_sweep() for o in groups):
                return problem  # a glob()/range() of options: Hydra expands and checks it
            try:
                configs = _compositions(config_name, groups)
            except (HydraException, OmegaConfBaseException, ValueError):
                return None  # Hydra reports what it cannot compose itself
            values = [o for o in parsed if o not in groups]
            return _unknown_key(values, configs) or (
                None if flags & _PRINTING_FLAGS else _required_value_missing(configs[0], values))
    finally:
        GlobalHydra.instance().clear()


def _is_group(key: str, loader: Any) -> bool:
    return "/" in key or ("." not in key and bool(loader.get_group_options(key)))


def _choices(override: Any) -> list[str]:
    if override.is_choice_sweep():
        return list(override.sweep_string_iterator())
    value = override.value()
    return ["null" if value is None else str(value)]


def _unknown_group_choice(groups: list[Any], loader: Any) -> str | None:
    for override in groups:
        group = override.key_or_group
        options = loader.get_group_options(group)
        if override.is_delete() or not options or (
                override.is_sweep_override() and not override.is_choice_sweep()):
            continue
        for value in _choices(override):
            if value not in options:  # null too: Hydra fails on it with a traceback
                name = group.split("/")[-1]
                return (f"{group}={value}: unknown {name}; valid: {', '.join(sorted(options))} "
                        f"(~{group} leaves it out)")
    return None


def _compositions(config_name: str, groups: list[Any]) -> list[DictConfig]:
    """The configs the command line's group choices compose: the first option of every swept
    group, then each further option of a swept group in turn (``loss=bce,tversky`` composes
    both, so ``loss.alpha`` is a key of that sweep)."""
    fixed = [o.input_line for o in groups if o.is_delete()]
    chosen = [(o.get_key_element(), _choices(o)) for o in groups if not o.is_delete()]
    first = [f"{key}={values[0]}" for key, values in chosen]
    variants = [first] + [first[:i] + [f"{key}={value}"] + first[i + 1:]
                          for i, (key, values) in enumerate(chosen) for value in values[1:]]
    return [compose(config_name, overrides=[*variant, *fixed], return_hydra_config=True)
            for variant in variants]


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether Hydra could set ``key``: it exists, or its parent is an open mapping."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, ListConfig):
            if not (part.isdigit() and int(part) < len(node)):
                return False
        elif isinstance(node, DictConfig) and not node._is_none():
            if part not in node.keys():
                return not OmegaConf.is_struct(node)
        else:
            return False
        node = node._get_node(int(part) if isinstance(node, ListConfig) else part)
    return True


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (mappings only, not list items), nodes and leaves."""
    if not isinstance(node, dict):
        return []
    keys = []
    for name, child in node.items():
        keys.append(f"{prefix}{name}")
        keys += _flat_keys(child, f"{prefix}{name}.")
    return keys


def _unknown_key(values: list[Any], configs: list[DictConfig]) -> str | None:
    for override in values:
        if override.is_add() or override.is_force_add() or override.package is not None:
            continue  # +key / ++key add on purpose
        key = override.key_or_group
        if any(_has_key(cfg, key) for cfg in configs):
            continue
        known = sorted({k for cfg in configs
                        for k in _flat_keys(OmegaConf.to_container(cfg, resolve=False))
                        if k.startswith("hydra.") == key.startswith("hydra.")})
        return f"{key}: no such key; {_closest_keys(key, known)}"
    return None


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
    children = [k.rsplit(".", 1)[-1] for k in known
                if k.rsplit(".", 1)[0] == parent and k != parent] if parent else \
        [k for k in known if "." not in k]
    return f"{parent or 'the config'} has: {', '.join(children)}"


def _required_value_missing(cfg: DictConfig, values: list[Any]) -> str | None:
    given = {o.key_or_group for o in values}
    missing = [key for key in _flat_keys(OmegaConf.to_container(cfg, resolve=False))
               if not key.startswith("hydra.") and key not in given
               and OmegaConf.is_missing(cfg, key)]
    if not missing:
        return None
    example = " ".join(f"{key}=..." for key in missing)
    return f"{', '.join(missing)}: required, not given (add {example} to the command line)"


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


# Whether the user asked for tracebacks, as recorded by the outermost tool (one_line_errors).
TRACEBACKS = "PROSTATE_SEG_FULL_ERROR"


@contextmanager
def one_line_errors(show_traceback: bool = False) -> Iterator[None]:
    """Errors that escape Hydra (a run folder or log file it cannot create, a failed job of an
    in-process sweep) are also one line with exit code 2. Hydra passes exceptions on instead of
    printing them only with HYDRA_FULL_ERROR set; bugs, and every error with
    ``show_traceback``, then show their full traceback."""
    saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", TRACEBACKS)}
    # The user's own choice, for the jobs this process starts (gpu_pool, SLURM): they inherit
    # the HYDRA_FULL_ERROR=1 set below, which the user did not ask for.
    os.environ.setdefault(TRACEBACKS, "1" if saved["HYDRA_FULL_ERROR"] == "1" else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - bugs are re-raised below
        line = error_line(exc)
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


# What Hydra writes into every run folder before the task starts (besides the job's log).
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def remove_bookkeeping_folder(run_dir: Path, log_name: str) -> bool:
    """Remove ``run_dir`` when it holds nothing but Hydra's bookkeeping (``.hydra/``, the
    job's log) and the run lock, then its parents that this leaves empty, up to the working
    directory: a command that stopped before its own work leaves no folder (its log only
    repeated the console). A folder holding anything else is kept whole. True if removed."""
    hydra_dir = run_dir / ".hydra"
    try:
        entries = list(run_dir.iterdir())
        if any(e.name not in {".hydra", log_name, LOCK_FILE} or e.is_symlink() for e in entries):
            return False
        if hydra_dir.is_dir() and any(f.name not in _HYDRA_FILES or not f.is_file()
                                      for f in hydra_dir.iterdir()):
            return False
        for entry in entries:
            if entry.is_dir():
                for file in entry.iterdir():
                    file.unlink()
                entry.rmdir()
            else:
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


def _run(task: Callable[[DictConfig], Any], cfg: DictConfig, show_traceback: bool = False) -> Any:
    try:
        return task(cfg)
    except (UserError, OSError) as exc:
        _log_traceback_to_files()
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


def hydra_entry(task: Callable[[DictConfig], Any], config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over ``<config_name>.yaml`` of the project's configs.
    ``HYDRA_FULL_ERROR=1`` shows the traceback of every error (Hydra's own switch)."""
    problem = command_line_problem(sys.argv[1:], config_name)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    show_traceback = tracebacks_wanted()

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        return _run(task, cfg, show_traceback)

    with one_line_errors(show_traceback):
        _main()


def _task(module: str, name: str) -> Callable[[DictConfig], Any]:
    """``module.name``, imported when the task runs: ``--help`` and a typo answer before the
    heavy imports (torch, Lightning) of the stage."""
    def task(cfg: DictConfig) -> Any:
        return getattr(importlib.import_module(module), name)(cfg)
    return task


def train() -> None:
    hydra_entry(_task("prostate_seg.training.fit", "train"), config_name="train")


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
