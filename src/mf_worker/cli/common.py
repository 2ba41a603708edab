"""What every ``mf-worker`` command shares: the typer app, common options, settings, exit codes.

Each command builds the settings once (environment, then its flags) with `build_settings`, sets
up logging, and runs one async entry point through `run_async`, which turns our errors into one
line and an exit code. Results go to stdout, logs to stderr. Exit codes: 0 success, 1 the work
failed, 2 bad configuration or usage, 3 nothing to do (``run-once`` with nothing due).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
from psycopg_pool import PoolTimeout

from .. import __version__
from ..db import Connection, connect
from ..errors import ConfigError, MfWorkerError, describe_error
from ..logs import configure_logging, get_logger, mask, register_secret
from ..plugins import entry_point_targets, import_target
from ..settings import Settings, load_settings, settings_secrets

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NOTHING_TO_DO = 3

T = TypeVar("T")

COMMANDS_GROUP = "mf_worker.commands"
"""Entry points naming typer apps added as command groups (``console``): layers above the
command line register their commands this way, so the CLI never imports them."""

app = typer.Typer(
    name="mf-worker",
    help="Schedules and generates Many Futures episodes from a PostgreSQL queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (default: $MF_DATABASE_URL, then $DATABASE_URL).",
        show_default=False,
    ),
]
LogFormat = Annotated[
    str | None, typer.Option("--log-format", help="auto, json or console ($MF_LOG_FORMAT).")
]
Actor = Annotated[
    str | None,
    typer.Option(
        "--actor",
        help="Who is acting, for the audit log (default: the OS user running the command).",
        show_default=False,
    ),
]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="Log level ($MF_LOG_LEVEL).")]


def fail(message: str, code: int) -> NoReturn:
    """Print ``mf-worker: error: message`` on stderr and exit with ``code``."""
    typer.echo(f"mf-worker: error: {mask(message)}", err=True)
    raise typer.Exit(code)


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment and the command's flags; logging configured from them."""
    try:
        settings, warnings = load_settings(overrides=overrides)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    for secret in settings_secrets(settings):  # masked in every log line and error from now
        register_secret(secret)
    configure_logging(settings.log_format, settings.log_level)
    log = get_logger("mf_worker.settings")
    for warning in warnings:
        log.warning("unknown_setting", detail=warning)
    return settings


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine, turning our errors into one clear line and an exit code."""
    try:
        return asyncio.run(main())  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    except MfWorkerError as exc:
        fail(str(exc), EXIT_FAILED)
    except (psycopg.Error, PoolTimeout) as exc:
        fail(f"database error: {describe_error(exc)}", EXIT_FAILED)
    except OSError as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mf-worker {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Schedules and generates Many Futures episodes from a PostgreSQL queue."""



Concurrency = Annotated[
    int | None, typer.Option("--concurrency", help="Items in flight ($MF_CONCURRENCY).")
]
GeneratorOpt = Annotated[
    str | None,
    typer.Option("--generator", help="Generator plugin: entry-point name or module:attr."),
]


def connect_error(exc: BaseException) -> MfWorkerError:
    """The error a command reports when the database cannot be reached."""
    return MfWorkerError(f"cannot connect to the database: {describe_error(exc)}")


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Connection]:
    """One autocommit connection for a CLI command, with a clear error if it cannot connect."""
    try:
        conn = await connect(settings)
    except psycopg.OperationalError as exc:
        raise connect_error(exc) from None
    async with conn:
        yield conn



def register_command_groups() -> None:
    """Add every ``mf_worker.commands`` entry point's typer app under its name."""
    for name, target in sorted(entry_point_targets(COMMANDS_GROUP).items()):
        group = import_target(name, target, kind="command group")
        if isinstance(group, typer.Typer):
            app.add_typer(group, name=name)
