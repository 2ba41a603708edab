"""Logging set-up: structlog to stderr, JSON lines in production, readable on a terminal.

Log messages are stable event names (``item_claimed``, ``lease_lost``); context such as the
queue item is bound once with :func:`bind_item` and rides on every line after it. Secrets that
the process knows (database password, API keys) are masked in every line by a processor, as a
second line of defence behind never passing them to a logger in the first place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

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


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, "***")
    return value


def _mask_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event_dict.items():
            event_dict[key] = _mask(value)
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
        _mask_secrets,
    ]
    if use_json:
        shared.append(structlog.processors.format_exc_info)
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
