"""A config node's arguments checked against the signature of what its ``_target_`` builds,
before it is built: a name the class does not take, or a value of a type its annotation does not
allow. Lightning's Trainer takes ``num_sanity_val_steps='abc'`` and fails only in fit; torch's
Adam counts ``amsgrad='no'`` as true; a logger is not built before the run's folder exists."""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections import abc
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prostate_seg.errors import ConfigError
from prostate_seg.settings import shown

_LISTS = (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Iterable,
          abc.Collection)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)
_SCALARS = (bool, int, float, type(None))


def check_arguments(key: str, node: DictConfig, given: typing.Iterable[str] = ()) -> None:
    """ConfigError naming ``key.ARGUMENT`` when an argument of ``node`` (other than the
    ``given`` ones, passed by the code) is not in the target's signature or not of its
    annotated type; nested nodes with a ``_target_`` are checked alike. A target that cannot be
    imported or inspected is left to Hydra's instantiate, which names it."""
    from hydra.utils import get_object

    try:
        target = get_object(str(node["_target_"]))
        signature = inspect.signature(target)
    except Exception:  # noqa: BLE001 - Hydra's instantiate says why in its own words
        return
    name = getattr(target, "__name__", str(node["_target_"]))
    parameters = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for argument in node:
        argument = str(argument)
        if argument.startswith("_") or argument in given:
            continue
        if argument not in parameters and not takes_any:
            named = [p for p, v in parameters.items()
                     if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
            raise ConfigError(f"{key}.{argument}: {name} takes no such argument; it takes "
                              f"{', '.join(named)}")
    hints = _hints(target)
    for argument in node:
        argument = str(argument)
        if argument.startswith("_") or argument in given:
            continue
        try:
            value = node[argument]
        except OmegaConfBaseException:  # an interpolation the run resolves: checked in it
            continue
        if value is None and OmegaConf.is_interpolation(node, argument):
            continue  # ${hydra:runtime.output_dir} before the job starts (a sweep's check)
        if isinstance(value, DictConfig) and "_target_" in value:
            check_arguments(f"{key}.{argument}", value)
        elif argument in hints and not fits(value, hints[argument]):
            raise ConfigError(f"{key}.{argument}={shown(value)}: {name} takes "
                              f"{describe(hints[argument])}")


def _hints(target: Any) -> dict[str, Any]:
    """The target's argument annotations; none where they cannot be evaluated (a name imported
    only for type checkers)."""
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - unannotated or unresolvable: nothing to check against
        return {}


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (a YAML scalar, list or mapping) can be what ``hint`` says; an
    annotation this does not understand allows anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # an object Hydra builds, checked on its own
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in _LISTS or hint in _LISTS:
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(fits, value, args))
        return not args or all(fits(item, args[0]) for item in value)
    if origin in _MAPPINGS or hint in _MAPPINGS:
        return isinstance(value, (DictConfig, dict))
    if isinstance(hint, type):
        if isinstance(value, hint):
            return True
        if issubclass(hint, os.PathLike):
            return isinstance(value, str)
        # a number, null or list where an object belongs; a name or settings may convert
        return not isinstance(value, (*_SCALARS, ListConfig, list, tuple))
    return True


def describe(hint: Any) -> str:
    """``an integer or null``, ``true, false, warn or null``, ``a Profiler, a string or null``."""
    parts: list[str] = []

    def add(hint: Any) -> None:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(hint):
                add(arg)
            return
        texts = ([str(arg) for arg in typing.get_args(hint)] if origin is typing.Literal
                 else ["true", "false"] if hint is bool
                 else [{type(None): "null", int: "an integer", float: "a number",
                        str: "a string"}.get(hint) or (
                     _list(hint) if origin in _LISTS or hint in _LISTS
                     else "a mapping" if origin in _MAPPINGS or hint in _MAPPINGS
                     else f"a {getattr(hint, '__name__', hint)}")])
        parts.extend(text for text in texts if text not in parts)

    add(hint)
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


def _list(hint: Any) -> str:
    """``a list``, ``a list of 2 items, each a number or a Tensor``."""
    args = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
    fixed = typing.get_origin(hint) is tuple and Ellipsis not in typing.get_args(hint)
    count = f" of {len(args)} items" if fixed and args else ""
    each = f", each {describe(args[0])}" if args and len(set(args)) == 1 else ""
    return f"a list{count}{each}"
