"""Logging set-up: structlog to stderr, JSON lines in production, readable on a terminal.

Log messages are stable event names (``item_claimed``, ``lease_lost``); context such as the
queue item is bound once with :func:`bind_item` and rides on every line after it.

This is also the one place that masks secrets, wherever text leaves the process: log lines
(a processor), ``mf-worker config`` and the CLI's error line (`mask`), a setting's value in an
error message (`mask_url_password`). Two rules: every secret the process knows (registered
with `register_secret` at start-up: each secret setting, the password of every URL-valued
setting, API keys) is replaced by ``***``; and any password that text carries in a URL
(``scheme://user:PASSWORD@host``, ``?password=…``) or a libpq string (``password=…``) is masked
even when nobody registered it. A second line of defence behind never passing a secret to a
logger in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
import urllib.parse
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["bind_item", "configure_logging", "get_logger", "mask", "mask_url_password",
           "register_secret", "url_passwords"]

import structlog

_secrets: set[str] = set()

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line (ignored if short or empty)."""
    if value and len(value) >= 4:
        _secrets.add(value)


# scheme://user:PASSWORD@host (or a mistyped scheme:/…, which a parser refuses and its error
# quotes): the authority runs to the first / ? or #, its user part to its last @ (an
# unencoded @ in a password stays inside it); the password follows the user name's colon.
_URL_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*:/{0,3}[^\s/?#@:'\"]*:)"
                           r"(?P<password>[^\s/?#'\"]*)(?=@[^\s@/?#'\"]*(?:[/?#\s'\"]|$))")
# ?password=… &sslpassword=… (libpq URLs), and other secret-looking query parameters.
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:[A-Za-z0-9_\-]*(?:password|passwd|pwd|secret|token|api[_\-]?key)"
    r"[A-Za-z0-9_\-]*)=)(?P<password>[^&#\s'\"]*)", re.I)
# libpq key=value: password = secret, or password='it''s \' quoted'.
_CONNINFO_PASSWORD = re.compile(
    r"(?P<head>(?<![?&\w\-])(?:ssl)?password\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|[^\s']+)", re.I)


def mask_url_password(text: str) -> str:
    """``text`` with the password of every URL or libpq connection string in it replaced by
    ``***``: the user, host, port, path and the other parameters stay, so the value is still
    recognisable (``postgresql://mf_worker:***@db:5432/mf``)."""
    for pattern in (_URL_USERINFO, _QUERY_SECRET, _CONNINFO_PASSWORD):
        text = pattern.sub(lambda m: f"{m.group('head')}***" if m.group("password") else
                           m.group(0), text)
    return text


def url_passwords(text: str) -> list[str]:
    """The passwords `mask_url_password` would mask in ``text``, as written and decoded (a
    library may show either), for `register_secret`."""
    found: list[str] = []
    for pattern in (_URL_USERINFO, _QUERY_SECRET, _CONNINFO_PASSWORD):
        for match in pattern.finditer(text):
            password = match.group("password")
            if len(password) >= 2 and password[0] == password[-1] == "'":
                password = re.sub(r"\\(.)", r"\1", password[1:-1])
            found += [password, urllib.parse.unquote(password)]
    return [p for p in dict.fromkeys(found) if p]


def mask(value: Any) -> Any:
    """``value`` with every registered secret and every URL or connection-string password
    masked; strings inside lists, tuples and dicts too. Anything else is returned as it is."""
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return mask_url_password(value)
    if type(value) is dict:  # exactly these: a subclass (a namedtuple …) is left as it is
        return {k: mask(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(mask(v) for v in value)
    return value


def _mask_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if key != "_record":  # the stdlib record (foreign lines): its message is in "event"
            event_dict[key] = mask(value)
    return event_dict


def configure_logging(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging (psycopg, the pool) to ``stream`` (stderr).

    Stdout stays free for command results, so ``mf-worker status --json | jq`` works.
    """
    stream = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # The traceback becomes text before the masking, so a secret in an exception's
        # message is masked in it too (in both formats).
        structlog.processors.format_exc_info,
        _mask_secrets,
    ]
    numeric_level = _LEVELS[level]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (psycopg's pool) only from warnings up unless we debug.
    root.setLevel(logging.DEBUG if numeric_level <= logging.DEBUG else logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``name`` becomes the ``logger`` key when given."""
    logger = structlog.get_logger()
    return logger.bind(logger=name) if name else logger


@contextmanager
def bind_item(**context: Any) -> Iterator[None]:
    """Bind context (queue_id, project_id, organization_id, attempt) for the lines inside."""
    with structlog.contextvars.bound_contextvars(**context):
        yield
