"""The exception hierarchy: one base, a few meaningful kinds.

Callers branch on the type, never on the message; messages are written for operators and name
what is wrong and where (the variable, the field, the item) without ever carrying a secret.
"""

from __future__ import annotations


class MfWorkerError(Exception):
    """Base class of every error mf-worker raises on purpose."""


class ConfigError(MfWorkerError):
    """A setting is missing or invalid; the message names the variable and the bad value."""


class MigrationError(MfWorkerError):
    """The database schema cannot be brought to, or is not at, the version this code expects."""


class SchemaNotCurrentError(MigrationError):
    """The database has pending migrations (or unknown ones); run `mf-worker migrate`."""


class PluginLoadError(MfWorkerError):
    """A generator or notifier plugin named in the settings cannot be found or loaded."""


class InvalidItemError(MfWorkerError):
    """A queue item's data in the database is unusable (deleted project, bad zone, bad cadence)."""


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` — short enough for a log field or ``last_error``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
