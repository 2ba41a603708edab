"""The exception hierarchy: one base, a few meaningful kinds.

Every exception class mf-worker defines derives from :class:`MfWorkerError` (a test walks the
package to keep it so), wherever it lives: the kinds every layer shares are here, the ones that
belong to one subsystem beside it (``GenerationError`` in the plugin API, ``CostLimitReached``
in ``cost``, ``MailError`` in the mail notifier). As in psycopg_pool, a class's docstring is its
default message: raised without arguments, an error still says what went wrong.

Callers branch on the type, never on the message; messages are written for operators and name
what is wrong and where (the variable, the field, the item) without ever carrying a secret.
"""

from __future__ import annotations


class MfWorkerError(Exception):
    """Base class of every error mf-worker raises on purpose."""

    def __str__(self) -> str:
        # Raised without a message, the class's docstring says what went wrong (its first
        # paragraph, on one line).
        return super().__str__() or " ".join((type(self).__doc__ or "").split("\n\n")[0].split())


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


class LeaseLost(MfWorkerError):
    """The claim no longer holds: the item was reaped, cancelled or taken over."""

    def __init__(self, queue_id: str | None = None) -> None:
        # The item's id is the message, as before (logs and tests show it).
        super().__init__(*(() if queue_id is None else (queue_id,)))
        self.queue_id = queue_id


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` — short enough for a log field or ``last_error``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
