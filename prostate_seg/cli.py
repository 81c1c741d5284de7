"""The command line (``python -m prostate_seg COMMAND``, console scripts, ``train.py``): Hydra
composes once, and what the user must fix is one ``error: ...`` line with exit status 2."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import select
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra._internal.utils import get_args_parser  # what hydra.main reads sys.argv with
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationKeyError,
                              InterpolationResolutionError, OmegaConfBaseException)

from prostate_seg.config import (CONF_DIR, CONFIG_PATH, check_extras_installed,
                                 initialize_configs, openmp_yields)
from prostate_seg.errors import ConfigError, UserError, error_line
from prostate_seg.settings import (ABSENT, check_settings, check_values_in, missing_reference,
                                   referred, removable, shown)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def is_command_line_error(exc: BaseException, printing: bool = False) -> bool:
    """Whether Hydra stopped on the command line or the configs it names, not in the task
    (``printing``: the command line only asks for the config, --cfg job --resolve)."""
    if isinstance(exc, (ConfigCompositionException, OverrideParseException, SearchPathException,
                        yaml.YAMLError)):
        return True
    if isinstance(exc, InterpolationResolutionError):  # Hydra's own keys (hydra.run.dir)
        return printing or str(exc.full_key).startswith("hydra.")
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, ValueError) and bool(frames) and Path(
        frames[-1].filename).is_relative_to(Path(hydra.__file__).parent)


@contextmanager
def _config_loader() -> Iterator[Any]:
    GlobalHydra.instance().clear()
    try:
        with initialize_configs():
            yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().clear()


@contextmanager
def _app_loader() -> Iterator[Any]:
    """The running Hydra app's config loader, whose search path holds the user's config folders
    (--config-dir); the project's outside an app (a test composing on its own)."""
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
    else:
        with _config_loader() as loader:
            yield loader


def _compose(config_name: str, overrides: list[str], multirun: bool) -> DictConfig:
    with _config_loader() as loader:
        return loader.load_configuration(
            config_name, overrides, RunMode.MULTIRUN if multirun else RunMode.RUN)


def printing_only(argv: list[str]) -> bool:
    """Whether the command line asks Hydra to print (--cfg, --info, --help) and run nothing."""
    args = _parsed(argv)
    return bool(args and (args.help or args.hydra_help or args.cfg or args.info
                          or args.shell_completion))


def _hydra_alone(argv: list[str]) -> bool:
    """--cfg hydra --resolve: Hydra resolves its own settings without the config's."""
    args = _parsed(argv)
    return bool(args and args.cfg == "hydra" and args.resolve)


def _parsed(argv: list[str]) -> argparse.Namespace | None:
    try:
        return parse_args(argv)
    except ConfigError:  # a flag Hydra does not know: named on its own
        return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Hydra's command line as hydra.main reads it; a flag it does not know is one line (argparse
    would print its usage first)."""
    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ConfigError(f"{message} (--help lists what a command takes)")
    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(argv)


def config_problem(config_name: str, argv: list[str]) -> str | None:
    """The one line ``python <tool> *argv`` would stop with before its task; None if none."""
    args = parse_args(argv)
    try:
        cfg, composed = _composed(args, config_name)
    except Exception as exc:  # noqa: BLE001 - what is not the command line's is re-raised
        if not is_command_line_error(exc):
            raise
        return hydra_error_line(exc, config_name, argv)
    if composed or args.multirun or printing_only(argv):
        return composed
    return required_values_problem(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def hydra_error_line(exc: BaseException, config_name: str, argv: list[str]) -> str:
    """Hydra's error as one line; an unknown option or key names the valid or closest ones."""
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the command line: {_message(exc)}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return (f"{mark.name}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                f"{exc.problem}")
    if isinstance(exc, InterpolationResolutionError) and exc.full_key is None:  # --cfg --resolve
        exc = _unresolvable(config_name, argv, exc) or exc
    if isinstance(exc, InterpolationKeyError) and _hydra_alone(argv):
        return (f"--cfg hydra --resolve: Hydra resolves its settings apart from the config, which "
                f"they refer to ({referred(exc)}); --cfg all "
                "--resolve shows both resolved")
    if isinstance(exc, InterpolationKeyError):  # hydra.run.dir after ~paths
        return missing_reference(exc)
    if isinstance(exc, InterpolationResolutionError):  # ${oc.env:UNSET} in hydra.run.dir
        return (f"{exc.full_key}: " if exc.full_key else "") + str(exc).splitlines()[0]
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.rpartition("/")
        return _unknown_option(group, value, exc.options, config_name)
    args = parse_args(argv)
    key = _unknown_key(exc)
    if key is not None:
        return unknown_key_line(key, _composed_without(config_name, args, key))
    null_group = _null_group_choice(args, config_name) if isinstance(exc, ValueError) else None
    if null_group:
        return null_group
    cause = exc.__cause__
    return _message(exc) + (f": {_message(cause).split('; ')[0]}" if isinstance(
        cause, OmegaConfBaseException) else "")


def _unresolvable(config_name: str, argv: list[str], error: InterpolationResolutionError
                  ) -> InterpolationResolutionError | None:
    """The same ``error`` naming its key, where OmegaConf's resolve of the whole config
    (--cfg job --resolve) does not: of the keys failing with it, the one whose own value fails
    rather than refers to another that does (loss.alpha, not the loss.name built from it)."""
    try:
        cfg = _composed(parse_args(argv), config_name)[0]
        written = _flat_items(OmegaConf.to_container(cfg, resolve=False))
    except Exception:  # noqa: BLE001 - Hydra's own message is the fallback
        return None
    failing: dict[str, InterpolationResolutionError] = {}
    for key, value in written:
        if isinstance(value, str) and "${" in value:
            try:
                OmegaConf.select(cfg, key)
            except InterpolationResolutionError as exc:  # hydra.runtime is set in the app only
                if str(exc).splitlines()[0] == str(error).splitlines()[0]:
                    failing[key] = exc
    def refers(key: str, value: str) -> list[str]:  # ${a.b} and ${.b} (relative to key's node)
        refs = re.findall(r"\$\{(\.*)([\w.]+)\}", value)
        return [".".join([*key.split(".")[:-len(dots)], ref]) if dots else ref
                for dots, ref in refs]

    roots = [key for key, value in written if key in failing
             and not any(ref in failing for ref in refers(key, value))]
    ranked = sorted([*roots, *failing], key=lambda key: key.startswith("hydra."))  # the task's
    return failing[ranked[0]] if ranked else None


def _message(exc: BaseException) -> str:
    """Hydra's message on one line, without the config search path it may list."""
    text = str(exc).split("Config search path:")[0]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(
        exc).__name__


def _unknown_option(group: str, value: str, options: list[str], command: str) -> str:
    return (f"{group}={value}: unknown {group.split('/')[-1]}; valid: {', '.join(sorted(options))}"
            + (f" (~{group} leaves it out)" if removable(command, group) else ""))


def removal_problem(loader: Any, config_name: str, command: str, overrides: list[str],
                    mode: RunMode = RunMode.RUN) -> str | None:
    """``~KEY`` of a key or group ``command`` reads and cannot run without (settings.REMOVABLE),
    or one Hydra cannot remove (it reads the value first: null reads as absent, and the run's
    folder is not known yet); found by composing ``config_name`` without the removals. A key
    it does not have is left to Hydra, which names the closest one."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return None  # Hydra's own line names it
    removed = [o.key_or_group for o in parsed if o.is_delete()]
    if not removed:
        return None
    kept = [text for text, o in zip(overrides, parsed) if not o.is_delete()]
    try:
        cfg = loader.load_configuration(config_name, kept, mode)
    except Exception:  # noqa: BLE001 - the command line's other mistakes are Hydra's to name
        return None
    choices = cfg.hydra.runtime.choices  # group: option (None: the group is not in use)
    written, groups = command_config(command)
    for key in removed:  # a user's --config-dir adds the project's groups at composing only
        options = sorted({*loader.get_group_options(key), *groups.get(key, [])})
        value = ABSENT if options else _unresolved(cfg, key.replace("/", "."))
        if choices.get(key) is None if options else value is ABSENT:
            continue
        read = re.split(r"[./]", key)[0] in written or key in groups or key.startswith("hydra/")
        if read and not removable(command, key):
            instead = (f"choose one of {', '.join(options)} instead" if options
                       else "give it a value instead")
            return f"~{key}: {command} cannot run without {key}; {instead}"
        if value is None:
            return f"~{key}: it is null already, which Hydra cannot remove"
        try:
            OmegaConf.select(cfg, key)
        except OmegaConfBaseException:  # ${hydra:runtime.output_dir}, before the run starts
            return (f"~{key}: Hydra reads a value before removing it, and {value} is known only "
                    "once the run starts; give it a value instead")
    return None


def _unresolved(cfg: DictConfig, key: str) -> Any:
    """The value of ``key`` as written (``${paths.output_dir}``), or ABSENT."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=ABSENT) if parent else cfg
    if not isinstance(node, DictConfig) or last not in node.keys():
        return ABSENT
    return OmegaConf.to_container(node, resolve=False)[last]


@contextmanager
def _loader_as_main(args: argparse.Namespace) -> Iterator[tuple[Any, list[str]]]:
    """A config loader over the folders hydra.main will search for these arguments, and the
    overrides that add them: --config-path replaces the project's folder (relative to this
    file, as Hydra takes it); --config-dir's folder is searched first, the project's through
    ``hydra.searchpath`` (where Hydra would search the project's first: the same unless a
    user's file has a project file's name)."""
    GlobalHydra.instance().clear()
    path, added = args.config_path, []
    if args.config_dir:
        path = os.path.abspath(args.config_dir)
        added = [f"hydra.searchpath=[file://{CONF_DIR}]"]
    if path is None:
        start = initialize_configs()
    elif path.startswith("pkg://"):
        start = hydra.initialize_config_module(config_module=path[len("pkg://"):],
                                               version_base="1.3")
    else:  # an absolute path stays itself
        start = hydra.initialize_config_dir(
            config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), path),
            version_base="1.3")
    try:
        with start:
            yield GlobalHydra.instance().config_loader(), added
    finally:
        GlobalHydra.instance().clear()


def _composed(args: argparse.Namespace, command: str) -> tuple[DictConfig | None, str | None]:
    """The config the command line composes, as hydra.main would, and its composed_problem."""
    name = args.config_name or command
    mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
    command_config(command)  # the project's, before a --config-path replaces them
    with _loader_as_main(args) as (loader, added):
        overrides = [*args.overrides, *added]
        early = (_unreadable_file(loader, name, args.overrides)  # Hydra may fail on these
                 or _null_in_group_sweep(loader, args.overrides)
                 or removal_problem(loader, name, command, overrides, mode))
        if early:
            return None, early
        cfg = loader.load_configuration(name, overrides, mode)
        return cfg, structure_problem(cfg, name, command) or _values_problem(cfg, command)


def _choices(loader: Any, overrides: list[str]) -> list[tuple[str, str, list[Any]]]:
    """(group, override, the options it chooses) of each group override on the command line."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return []  # Hydra's own line names it
    chosen = []
    for override in parsed:
        group = override.key_or_group
        if override.is_delete() or not loader.get_group_options(group):
            continue
        value = override.value()
        options = (value.list if isinstance(value, ChoiceSweep)
                   else value.filter(loader.get_group_options(group)) if isinstance(value, Glob)
                   else [value])
        chosen.append((group, override.input_line, options))
    return chosen


def _unreadable_file(loader: Any, name: str, overrides: list[str]) -> str | None:
    """A config file the command line names (the primary config, a group's option) holding a
    number, a string or a list, not settings: Hydra says "Invalid loaded object type" without
    the file, or takes a string for a key."""
    files = [f"{name}.yaml"] + [f"{group}/{option}.yaml"
                                for group, _, options in _choices(loader, overrides)
                                for option in options if isinstance(option, str)]
    for source in loader.get_sources():
        for file in files:
            path = Path(source.path) / file
            if source.scheme() != "file" or not path.is_file():
                continue
            try:
                content = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                continue  # Hydra names a YAML error with its line and column
            if content is not None and not isinstance(content, dict):
                return (f"{path}: holds {shown(content)}, not settings (a config file holds "
                        "key: value lines)")
    return None


def _null_in_group_sweep(loader: Any, overrides: list[str]) -> str | None:
    """``-m scheduler=cosine,null``: Hydra sweeps a group over option names only."""
    for group, line, options in _choices(loader, overrides):
        if len(options) > 1 and None in options:
            return (f"{line}: Hydra sweeps a group over its options' names, and null is not "
                    f"one; for runs without {group}, sweep again leaving it out (~{group} "
                    "removes one the config chooses)")
    return None


def _values_problem(cfg: DictConfig, command: str) -> str | None:
    """settings.check_values_in, where the values can be read before the app starts."""
    chdir = OmegaConf.select(cfg, "hydra.job.chdir", default=False)
    if chdir is not False:
        return (f"hydra.job.chdir={shown(chdir)}: the commands keep the folder they run in, whose "
                "relative paths they read (data.dir, outputs/); each run writes to its own folder")
    for key, value in _flat_items(OmegaConf.to_container(cfg, resolve=False)):
        if not isinstance(value, str) or key == "hydra.job.override_dirname":  # the command line
            continue
        for ref in re.findall(r"\$\{hydra:\s*([\w.]+)\s*\}", value):
            if _unresolved(cfg, f"hydra.{ref}") is ABSENT:  # Hydra's resolver would give null
                return (f"{key}: refers to hydra:{ref}, which Hydra's settings lack "
                        "(--cfg hydra lists them)")
    try:
        check_values_in(cfg, command)
    except ConfigError as exc:
        return str(exc)
    except OmegaConfBaseException:  # a value that needs the run (${hydra:...}): checked in it
        pass
    return None


def _composed_line(args: argparse.Namespace, command: str) -> str | None:
    """composed_problem before Hydra makes its folders (and a sweep its jobs), for whichever
    config the command line names; a config Hydra cannot compose is Hydra's to name."""
    try:
        return _composed(args, command)[1]
    except Exception:  # noqa: BLE001 - the app's own composition says what is wrong
        return None


@lru_cache(maxsize=None)
def command_config(command: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The command's own config as written (unresolved; not to be changed) and the groups it
    chooses from, with their options: what a config composed for the command must have. Taken
    before the Hydra app starts (hydra_entry), whose search path a user's --config-path
    replaces; empty if it cannot be found."""
    try:
        with _app_loader() as loader:
            reference = loader.load_configuration(command, [], RunMode.RUN)
            written = OmegaConf.to_container(reference, resolve=False)
            choices = written.pop("hydra")["runtime"]["choices"]
            groups = {group: loader.get_group_options(group) for group in choices
                      if not group.startswith("hydra/")}
    except MissingConfigException:
        return {}, {}
    return written, groups


def composed_problem(loader: Any, cfg: DictConfig, config_name: str, command: str,
                     overrides: list[str], mode: RunMode = RunMode.RUN) -> str | None:
    """What the composed config lacks that ``command`` reads: removal_problem, then
    structure_problem. ``loader`` searches the folders the config came from (inside the Hydra
    app: the user's too)."""
    return (removal_problem(loader, config_name, command, overrides, mode)
            or structure_problem(cfg, config_name, command))


def structure_problem(cfg: DictConfig, config_name: str, command: str) -> str | None:
    """A config not built on the command's own (another tool's, a user's): a key or group it
    reads missing, or a group of settings set to null or a single value."""
    reference, groups = command_config(command)
    lacking = [key for key in reference  # keys(): `in` skips ??? values
               if key not in cfg.keys() and not removable(command, key)]
    if lacking:
        named = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more"
                                          if len(lacking) > 4 else "")
        return (f"{config_name}: this config lacks {named}, which {command} reads (a config "
                f"of your own starts from {command}'s: defaults: [{command}, _self_])")
    for key in cfg.keys():
        value = _unresolved(cfg, key)
        if key not in reference and key in groups and not isinstance(value, dict):
            return (f"{key}={shown(value)} in config {config_name!r}: {key} is a group, whose "
                    f"option is chosen in the defaults list: - override {key}: {shown(value)}")
    for key, written in _flat_items(reference):
        value = _unresolved(cfg, key)
        if (isinstance(written, dict) and value is not ABSENT and not isinstance(value, dict)
                and not removable(command, key)):
            where = ("; a group's option is chosen in the defaults list: - override "
                     f"{key}: NAME" if key in groups else "")
            return (f"{key}={shown(value)} in config {config_name!r}: {command} needs a group "
                    f"of settings there{where}")
    return None


def check_composed(cfg: DictConfig, hydra_cfg: DictConfig, command: str, loader: Any) -> None:
    """What a command checks of its composed config before its task starts (and a sweep, of
    every job before the first): ConfigError with the line."""
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    problem = composed_problem(loader, cfg, hydra_cfg.job.config_name, command, overrides,
                               hydra_cfg.mode) or required_values_problem(cfg)
    if problem:
        raise ConfigError(problem)
    check_settings(cfg, command)


def _unknown_key(exc: BaseException) -> str | None:
    """The key Hydra's error says does not exist (set, or deleted with ``~``), if it says so."""
    if isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        return exc.__cause__.full_key
    deleted = re.fullmatch(r"Could not delete from config\. '(.+)' does not exist\.", str(exc))
    return deleted.group(1) if deleted else None


def _composed_without(config_name: str, args: argparse.Namespace, key: str) -> list[DictConfig]:
    """The config composed without the overrides of unknown keys, for suggestions (on this
    error path only); none when another config folder is named or it fails otherwise."""
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
    """``loss.alpa: no such key; did you mean loss.alpha?``, from the keys of ``configs``."""
    known = sorted({k for cfg in configs
                    for k, _ in _flat_items(OmegaConf.to_container(cfg, resolve=False))
                    if k.startswith("hydra.") == key.startswith("hydra.")})
    return f"{key}: no such key" + (f"; {_closest_keys(key, known)}" if known else "")


def _null_group_choice(args: argparse.Namespace, command: str) -> str | None:
    """``scheduler=null``: Hydra says only that a group choice may not be null."""
    with _config_loader() as loader:
        for override in OverridesParser.create().parse_overrides(args.overrides):
            options = loader.get_group_options(override.key_or_group)
            if override.value() is None and not override.is_delete() and options:
                return _unknown_option(override.key_or_group, "null", options, command)
    return None


def _flat_items(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every mapping node and leaf of a container (lists not entered)."""
    if not isinstance(node, dict):
        return []
    return [item for name, child in node.items()
            for item in [(f"{prefix}{name}", child), *_flat_items(child, f"{prefix}{name}.")]]


def _nearest(word: str, candidates: set[str] | list[str], cutoff: float) -> list[str]:
    """At most three candidates, best first, each within 0.05 of the best ratio (>= cutoff)."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates),
                    reverse=True)
    if not scored or scored[0][0] < cutoff:
        return []
    return [c for ratio, c in scored[:3] if ratio >= max(cutoff, scored[0][0] - 0.05)]


def _closest_keys(key: str, known: list[str]) -> str:
    """``did you mean`` the whole key's or its last part's nearest (``lr`` -> ``optimizer.lr``),
    else what the nearest existing parent holds."""
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
    """The user's ``???`` values, found without resolving the others (which may take seconds)."""
    missing = [key for key, value in _flat_items(OmegaConf.to_container(cfg, resolve=False))
               if value == "???" and not key.startswith("hydra.")]
    if not missing:
        return None
    example = " ".join(f"{key}=..." for key in missing)
    return f"{', '.join(missing)}: required, not given (add {example} to the command line)"


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
        with _app_loader() as loader:
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
        problem = _composed_line(args, config_name)
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
