"""Errors that are the user's to fix: shown as one line (no traceback) by the command-line tools."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or configuration. The message names the file or config key and what is wrong."""


class ConfigError(UserError, ValueError):
    """A config value is out of range or inconsistent (a ValueError to Python callers)."""


class DataError(UserError):
    """An input file or dataset folder is missing, unreadable or inconsistent."""


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite."""


class JobFailed(UserError):
    """A job of a sweep failed; the line names it and its log, which says why."""


def one_line(message: object) -> str:
    """A message of several lines (OmegaConf's and Hydra's add ``full_key:`` and the like) as
    the one line a user is shown."""
    text = ""
    for line in str(message).splitlines():
        line = line.strip()
        if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
            text += (" " if text.endswith(":") else "; " if text else "") + line
    return text


def error_line(exc: BaseException) -> str | None:
    """The line for a UserError or OSError (``PATH: reason (ENOSPC)``), also as another error's
    cause; None for a bug, which keeps its traceback."""
    while exc is not None:
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. from a loader worker
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return lines[-1] if lines else type(exc).__name__
        if isinstance(exc, OSError):
            to = f" -> {exc.filename2}" if exc.filename2 is not None else ""
            code = errno.errorcode.get(exc.errno or 0)
            return f"{exc.filename}{to}: {exc.strerror or exc}" + (f" ({code})" if code else "")
        exc = exc.__cause__
    return None
