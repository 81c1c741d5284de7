"""Errors that are the user's to fix: shown as one line (no traceback) by the command-line tools."""


class UserError(Exception):
    """Bad input or configuration. The message names the file or config key and what is wrong."""


class ConfigError(UserError):
    """A config value is out of range or inconsistent."""


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
