"""The ``mf-worker`` command line: the only place that reads the environment.

Each command builds the settings once (environment, then its flags), sets up logging, and runs
one async entry point. Results go to stdout, logs to stderr. Exit codes: 0 success, 1 the work
failed, 2 bad configuration or usage, 3 nothing to do (``run-once`` with nothing due).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from . import __version__
from .db import connect
from .db.migrate import apply_migrations, migration_status
from .errors import ConfigError, MfWorkerError
from .logs import configure_logging, get_logger, register_secret
from .settings import Settings, describe_settings, load_settings

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NOTHING_TO_DO = 3

T = TypeVar("T")

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
LogLevel = Annotated[str | None, typer.Option("--log-level", help="Log level ($MF_LOG_LEVEL).")]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"mf-worker: error: {message}", err=True)
    raise typer.Exit(code)


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment and the command's flags; logging configured from them."""
    try:
        settings, warnings = load_settings(overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    if settings.database_url is not None:
        register_secret(_password_of(settings.database_url.reveal()))
    configure_logging(settings.log_format, settings.log_level)
    log = get_logger("mf_worker.settings")
    for warning in warnings:
        log.warning("unknown_setting", detail=warning)
    return settings


def _password_of(conninfo: str) -> str | None:
    import psycopg.conninfo

    try:
        return psycopg.conninfo.conninfo_to_dict(conninfo).get("password")  # type: ignore[return-value]
    except psycopg.Error:
        return None


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine, turning our errors into one clear line and an exit code."""
    try:
        return asyncio.run(main())  # type: ignore[arg-type]
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except MfWorkerError as exc:
        _fail(str(exc), EXIT_FAILED)
    except OSError as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)


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


@app.command()
def migrate(
    status: Annotated[
        bool, typer.Option("--status", help="List applied and pending migrations; change nothing.")
    ] = False,
    database_url: DatabaseUrl = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Apply pending schema migrations (safe to run from many replicas at once)."""
    settings = build_settings(database_url=database_url, log_format=log_format, log_level=log_level)

    async def main() -> None:
        import psycopg

        try:
            conn = await connect(settings)
        except psycopg.OperationalError as exc:
            raise MfWorkerError(f"cannot connect to the database: {_first_line(exc)}") from None
        async with conn:
            if status:
                await _print_migration_status(conn)
                return
            applied = await apply_migrations(conn, get_logger("mf_worker.migrate"))
            if applied:
                for migration in applied:
                    typer.echo(f"applied {migration.label}")
            else:
                typer.echo("nothing to apply: all migrations were already applied")

    run_async(main)


async def _print_migration_status(conn: Any) -> None:
    st = await migration_status(conn)
    applied_at = {a.version: a.applied_at for a in st.applied}
    from .db.migrate import load_migrations

    for migration in load_migrations():
        when = applied_at.get(migration.version)
        state = f"applied {when:%Y-%m-%d %H:%M:%S%z}" if when else "pending"
        if migration in st.modified:
            state += " (file changed since it was applied)"
        typer.echo(f"{migration.label:40} {state}")
    for unknown in st.unknown:
        typer.echo(f"{unknown.version:04d}_{unknown.name:35} applied, unknown to this version")
    typer.echo(f"{len(st.applied)} applied, {len(st.pending)} pending")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="The reference table of all settings (README).")
    ] = False,
) -> None:
    """Show every setting: its variable, effective value (secrets masked) and meaning."""
    if markdown:
        typer.echo(settings_markdown_table())
        return
    settings = build_settings()
    rows = []
    for info in describe_settings():
        value = getattr(settings, info.name)
        shown = "***" if (info.secret and value is not None) else value
        rows.append({"variable": info.env, "value": shown, "default": info.default,
                     "doc": info.doc})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.echo(f"{row['variable']:24} = {row['value']!s:30} {row['doc']}")


def settings_markdown_table() -> str:
    """The settings reference as a Markdown table (the README embeds exactly this)."""
    lines = ["| Variable | Default | Flag | Meaning |", "| --- | --- | --- | --- |"]
    for info in describe_settings():
        if info.default is None:
            default = "—"
        elif isinstance(info.default, bool):
            default = "`on`" if info.default else "`off`"
        else:
            default = f"`{info.default}`"
        flag = f"`{info.flag}`" if info.flag else ""
        lines.append(f"| `{info.env}` | {default} | {flag} | {info.doc} |")
    return "\n".join(lines)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
