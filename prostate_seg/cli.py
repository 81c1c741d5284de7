"""The commands (``python -m prostate_seg COMMAND``, console scripts, ``train.py``) as Hydra
apps: what the user must fix is one ``error: ...`` line with exit status 2. Before Hydra makes
its folders, command_line composes the command line once more to name what it cannot do: Hydra's
own errors would come after a run or sweep folder exists, in its words."""

from __future__ import annotations

import importlib
import logging
import os
import select
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from prostate_seg.command_line import (app_loader, check_composed, composed_line,
                                       hydra_error_line, is_command_line_error, parse_args,
                                       printing_only)
from prostate_seg.config import CONFIG_PATH, check_extras_installed, openmp_yields
from prostate_seg.errors import ConfigError, UserError, error_line

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


# The user's HYDRA_FULL_ERROR, kept for the jobs a tool starts: they inherit the tool's own "1".
TRACEBACKS = "PROSTATE_SEG_FULL_ERROR"


@contextmanager
def one_line_errors(show_traceback: bool = False, config_name: str | None = None
                    ) -> Iterator[None]:
    """Errors that escape Hydra (it passes them on only with HYDRA_FULL_ERROR set) become one
    line and exit status 2; bugs, and everything with ``show_traceback``, keep the traceback."""
    saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", TRACEBACKS)}
    os.environ.setdefault(TRACEBACKS, "1" if saved["HYDRA_FULL_ERROR"] == "1" else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except BrokenPipeError as exc:
        if _stdout_reader_left():  # ``--help | head``: nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes at exit
        else:  # another pipe: named as any OSError
            print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if show_traceback:
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - bugs are re-raised below
        argv = sys.argv[1:]
        line = (hydra_error_line(exc, config_name, argv) if config_name
                and is_command_line_error(exc, printing_only(argv)) else error_line(exc))
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


def _stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reader closed it (the kernel's POLLERR on the write end)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def tracebacks_wanted() -> bool:
    """Whether the user set HYDRA_FULL_ERROR=1 (in a job: as its tool recorded it)."""
    return os.environ.get(TRACEBACKS, os.environ.get("HYDRA_FULL_ERROR")) == "1"


def remove_bookkeeping_folder(run_dir: Path, log_name: str, hydra_subdir: str | None = None
                              ) -> bool:
    """Remove ``run_dir`` if it holds only the command's log (and ``hydra_subdir``, where Hydra
    wrote its three files: a config without hydra.output_subdir: null), and the parents this
    empties up to the working directory: a command stopped before its work leaves no folder."""
    hydra_dir = run_dir / hydra_subdir if hydra_subdir else None

    def hydra_own(path: Path) -> bool:  # the folders down to hydra_dir, and its three files
        if path.is_symlink():
            return False
        if path.is_dir():
            return hydra_dir.is_relative_to(path)
        return path.parent == hydra_dir and path.name in ("config.yaml", "hydra.yaml",
                                                          "overrides.yaml")

    def bookkeeping(entry: Path) -> bool:
        if hydra_dir is not None and hydra_dir.is_relative_to(entry):
            return hydra_own(entry) and all(hydra_own(p) for p in entry.rglob("*"))
        return entry.name == log_name and entry.is_file() and not entry.is_symlink()

    try:
        entries = list(run_dir.iterdir())
        if not all(bookkeeping(e) for e in entries):
            return False
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry)
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


def _run(task: Callable[[DictConfig], Any], cfg: DictConfig, show_traceback: bool = False,
         command: str = "train") -> Any:
    try:
        with app_loader() as loader:
            check_composed(cfg, HydraConfig.get(), command, loader)
        return task(cfg)
    except (UserError, OSError) as exc:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher records the failed job and the sweep goes on
        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            remove_bookkeeping_folder(Path(hydra_cfg.runtime.output_dir),
                                      f"{hydra_cfg.job.name}.log", hydra_cfg.output_subdir)
        if show_traceback:
            raise
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class QuietConsole(logging.Filter):
    """The console's filter (conf/hydra/job_logging/quiet.yaml): library banners and harmless
    warnings go to the log file only, unless ``verbose=true``."""

    NOISY = ("pytorch_lightning", "lightning", "lightning_fabric",
             "hydra._internal.core_plugins.basic_launcher")
    HARMLESS = ("does not have many workers", "GPU available but not used", "srun",
                "is smaller than the logging interval", "exists and is not empty",
                "was called without a model", "there is no last checkpoint available",
                "is deprecated", "ckpt_path", "The number of training batches",
                "Consider setting `persistent_workers", "LeafSpec",
                "is not supported by the model summary")  # bf16: the summary's size estimate

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
    """Run ``task(cfg)`` as a Hydra app over the project's ``<config_name>.yaml``."""
    show_traceback = tracebacks_wanted()
    logging.captureWarnings(True)  # warnings go to the log file; the console keeps the useful
    openmp_yields()  # before any task imports torch

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        return _run(task, cfg, show_traceback, config_name)

    with one_line_errors(show_traceback, config_name):
        args = parse_args(sys.argv[1:])
        problem = composed_line(args, config_name)
        if problem:
            raise ConfigError(problem)
        _main()


def _task(module: str, name: str) -> Callable[[DictConfig], Any]:
    """Imported when the task runs: ``--help`` and a typo answer before torch is imported."""
    def task(cfg: DictConfig) -> Any:
        return getattr(importlib.import_module(module), name)(cfg)
    return task


def _train(cfg: DictConfig) -> Any:
    """A missing extra, a bad tracking store or a missing data folder is named before torch and
    Lightning load."""
    from prostate_seg.files import check_data_dir
    from prostate_seg.training.checks import check_tracking_uri

    check_extras_installed(cfg)
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

    with one_line_errors(tracebacks_wanted()):  # Ctrl-C, a closed pipe: as every command
        code = report_main()
    sys.exit(code)


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict, "prepare": prepare,
            "synthetic": synthetic, "report": report}


def main() -> None:
    """``python -m prostate_seg COMMAND ...``: the command's own arguments follow it."""
    usage = (f"usage: python -m prostate_seg {{{','.join(COMMANDS)}}} [...]  "
             "(python -m prostate_seg COMMAND --help: its settings)")
    if sys.argv[1:2] in (["--help"], ["-h"], ["help"]):
        print(usage)
        return
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 else ""
        print(f"error: {given}{usage}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    command = sys.argv.pop(1)
    COMMANDS[command]()
