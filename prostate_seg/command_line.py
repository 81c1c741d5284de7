"""What a command line asks, checked against the configs it names before Hydra makes a folder
(an unknown key with the nearest known one, a group option, a removal, a value), and Hydra's
own errors about it as one line: ``cli`` runs the commands on top of it."""
from __future__ import annotations

import argparse
import difflib
import os
import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra._internal.utils import get_args_parser  # what hydra.main reads sys.argv with
from hydra.core.global_hydra import GlobalHydra
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

from prostate_seg.config import CONF_DIR, initialize_configs
from prostate_seg.errors import ConfigError
from prostate_seg.settings import (ABSENT, check_settings, check_values_in, missing_reference,
                                   referred, removable, shown)


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
def app_loader() -> Iterator[Any]:
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
        configs = _composed_without(config_name, args, key)
        return _in_other_options(key, configs, args) or unknown_key_line(key, configs)
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
        if mode is RunMode.RUN and OmegaConf.select(cfg, "hydra.sweeper.dry_run"):
            return cfg, ("hydra.sweeper.dry_run=true: lists a sweep's jobs (add -m); without -m "
                         "this is one run, which would train")
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


def composed_line(args: argparse.Namespace, command: str) -> str | None:
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
        with app_loader() as loader:
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


_ABSENT = object()


def _in_other_options(key: str, configs: list[DictConfig], args: argparse.Namespace
                      ) -> str | None:
    """key_in_other_options for a single run's command line."""
    group = key.partition(".")[0]
    chosen = OmegaConf.select(configs[0], f"hydra.runtime.choices.{group}") if configs else None
    if not chosen:
        return None
    overrides = [o.input_line for o in OverridesParser.create().parse_overrides(args.overrides)
                 if o.key_or_group not in (key, group)]
    with _config_loader() as loader:
        options = [o for o in loader.get_group_options(group) if o != chosen]
    return key_in_other_options(key, [chosen], options, lambda choice: _compose(
        configs[0].hydra.job.config_name, [*overrides, choice], args.multirun))


def key_in_other_options(key: str, chosen: list[str], options: Iterable[str],
                         compose: Callable[[str], DictConfig]) -> str | None:
    """``loss.alpha: loss=dice has no such key (the loss options that have it: ...)``, or for a
    sweep ``none of loss=bce,dice has it``: the key belongs to other ``options`` of its group,
    each composed by ``compose('loss=tversky')``; None when none has it."""
    group = key.partition(".")[0]
    having = []
    for option in sorted(options):
        try:
            cfg = compose(f"{group}={option}")
        except Exception:  # noqa: BLE001 - an option that does not compose here has no say
            continue
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
            having.append(option)  # (tversky's beta: null is there)
    if not having:
        return None
    which = (f"{group}={chosen[0]} has no such key" if len(chosen) == 1
             else f"none of {group}={','.join(chosen)} has it")
    return f"{key}: {which} (the {group} options that have it: {', '.join(having)})"


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
