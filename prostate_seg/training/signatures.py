"""A config node's arguments checked against the signature of what its ``_target_`` builds,
before it is built: a name the class does not take, or a value of a type its annotation does not
allow. Lightning's Trainer takes ``num_sanity_val_steps='abc'`` and fails only in fit; torch's
Adam counts ``amsgrad='no'`` as true; a logger is not built before the run's folder exists."""

from __future__ import annotations

import difflib
import enum
import inspect
import os
import types
import typing
from collections import abc
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prostate_seg.errors import ConfigError
from prostate_seg.settings import removable, shown

_LISTS = (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Iterable,
          abc.Collection)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)
# Where a target's **kwargs go, for one that refuses them only once the run's folder exists (a
# logger is built in it): Lightning's TensorBoardLogger hands them to torch's SummaryWriter.
KEYWORDS_GO_TO = {"pytorch_lightning.loggers.tensorboard.TensorBoardLogger":
                  "torch.utils.tensorboard.SummaryWriter"}


def check_arguments(key: str, node: DictConfig, given: typing.Iterable[str] = ()) -> None:
    """ConfigError naming ``key.ARGUMENT`` when an argument of ``node`` (other than the
    ``given`` ones, passed by the code) is not in the target's signature or not of its
    annotated type; nested nodes with a ``_target_`` (in a list too) are checked alike. A target
    that cannot be imported or inspected is left to Hydra's instantiate, which names it."""
    from hydra.utils import get_object

    try:
        target = get_object(str(node["_target_"]))
        signature = inspect.signature(target)
    except Exception:  # noqa: BLE001 - Hydra's instantiate says why in its own words
        return
    name = getattr(target, "__name__", str(node["_target_"]))
    arguments = [str(a) for a in node if not str(a).startswith("_") and str(a) not in given]
    parameters, hints = dict(signature.parameters), _hints(target)
    onward = KEYWORDS_GO_TO.get(_initializer(target))
    if onward:  # its **kwargs are the arguments of what it builds
        receiver = get_object(onward)
        parameters = {**{p: v for p, v in parameters.items() if v.kind is not v.VAR_KEYWORD},
                      **inspect.signature(receiver).parameters}
        hints = {**_hints(receiver), **hints}
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        named = [p for p, v in parameters.items() if v.kind in (v.POSITIONAL_OR_KEYWORD,
                                                                 v.KEYWORD_ONLY)]
        for argument in arguments:
            if argument not in parameters:
                close = difflib.get_close_matches(argument, named, n=1, cutoff=0.75)
                leave = (f" (~{key}.{argument} leaves it out)"
                         if removable("train", f"{key}.{argument}") else "")
                hint = (f"did you mean {close[0]}?" if close
                        else f"it takes {', '.join(named)}{leave}")
                raise ConfigError(f"{key}.{argument}: {name} takes no such argument; {hint}")
    for argument in arguments:
        try:
            value = node[argument]
        except OmegaConfBaseException:  # an interpolation the run resolves: checked in it
            continue
        if value is None and OmegaConf.is_interpolation(node, argument):
            continue  # ${hydra:runtime.output_dir} before the job starts (a sweep's check)
        if argument in hints and not fits(value, hints[argument]):
            as_name = isinstance(value, (bool, int, float)) and all(  # a name of any spelling
                alternative in (str, type(None)) for alternative in _alternatives(hints[argument]))
            quote = (f" (a name Hydra reads as another type goes in quotes: "
                     f"{key}.{argument}=\"'{shown(value)}'\")" if as_name else "")
            raise ConfigError(f"{key}.{argument}={shown(value)}: {name} takes "
                              f"{describe(hints[argument])}{quote}")
        nested = ([(f"{key}.{argument}.{i}", item) for i, item in enumerate(value)]
                  if isinstance(value, ListConfig) else [(f"{key}.{argument}", value)])
        for where, item in nested:
            if isinstance(item, DictConfig) and "_target_" in item:
                check_arguments(where, item)


def _initializer(target: Any) -> str:
    """The class whose ``__init__`` a class target runs (a subclass may inherit it)."""
    if not inspect.isclass(target):
        return ""
    owner = next(c for c in inspect.getmro(target) if "__init__" in vars(c))  # object's at last
    return f"{owner.__module__}.{owner.__qualname__}"


def _alternatives(hint: Any) -> tuple[Any, ...]:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


def _hints(target: Any) -> dict[str, Any]:
    """The target's argument annotations; none where they cannot be evaluated (a name imported
    only for type checkers)."""
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - unannotated or unresolvable: nothing to check against
        return {}


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (a YAML scalar, list or mapping) can be what ``hint`` says; an
    annotation this does not understand (Any, a protocol) allows anything."""
    try:
        return _fits(value, hint)
    except TypeError:  # isinstance() refuses the annotation
        return True


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
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
        if issubclass(hint, enum.Enum):  # by value or by name (monai's Norm.BATCH, "batch")
            return any(value == m.value or value == m.name for m in hint)
        # a path as its name; an object Lightning would build from a name has str in its union
        return isinstance(value, hint) or (isinstance(value, str)
                                           and issubclass(hint, os.PathLike))
    return True


def describe(hint: Any) -> str:
    """``an integer or null``, ``true, false, warn or null``, ``a list of integers, a string or
    an integer``."""
    parts: list[str] = []

    def add(hint: Any) -> None:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(hint):
                add(arg)
            return
        texts = ([str(arg) for arg in typing.get_args(hint)] if origin is typing.Literal
                 else ["true", "false"] if hint is bool
                 else [_one(hint)])
        parts.extend(text for text in texts if text not in parts)

    add(hint)
    if "a number" in parts and "an integer" in parts:
        parts.remove("an integer")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


_KINDS = {type(None): ("null", "nulls"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values")}


def _one(hint: Any) -> str:
    """One alternative of an annotation: ``a string``, ``a list of numbers``, ``an Accelerator``."""
    origin = typing.get_origin(hint)
    if hint in _KINDS:
        return _KINDS[hint][0]
    if origin in _LISTS or hint in _LISTS:
        args = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        fixed = origin is tuple and Ellipsis not in typing.get_args(hint) and args
        count = f"{len(args)} " if fixed else ""
        if not args or len(set(args)) > 1:
            return f"a list of {count}items" if count else "a list"
        plural = _KINDS.get(args[0], (None, None))[1]
        return (f"a list of {count}{plural}" if plural
                else f"a list of {count}items (each {describe(args[0])})")
    if origin in _MAPPINGS or hint in _MAPPINGS:
        return "a mapping"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
