"""``mf-worker console`` (serve the console) and ``mf-worker console add-user``.

Registered on the command line through the ``mf_worker.commands`` entry point, so the CLI
(a lower layer) never imports the console. The web dependencies are imported only when the
console is served, so ``add-user`` needs just argon2 and ``--help`` needs nothing extra.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..cli.common import EXIT_CONFIG, DatabaseUrl, LogFormat, LogLevel, build_settings, fail
from .config import ConsoleSettings, parse_addr

__all__ = ["console_app"]

console_app = typer.Typer(
    help="The operator console, a web application (docs/console.md).",
    invoke_without_command=True, no_args_is_help=False,
)

_EXTRA = "the console needs its extra: pip install 'mf-worker[console]'"


@console_app.callback()
def serve(
    ctx: typer.Context,
    addr: Annotated[str | None, typer.Option(
        "--addr", help="host:port to listen on ($MF_CONSOLE_ADDR).", show_default=False)] = None,
    database_url: DatabaseUrl = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Serve the operator console on MF_CONSOLE_ADDR (default 127.0.0.1:8080)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = build_settings(database_url=database_url, log_format=log_format,
                              log_level=log_level)
    config = settings.plugin(ConsoleSettings)
    try:
        host, port = parse_addr(addr or config.addr)
    except ValueError as exc:
        fail(f"--addr={addr!r}: {exc}", EXIT_CONFIG)
    settings.require_database_url()
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        fail(f"{_EXTRA} ({exc})", EXIT_CONFIG)
    try:
        app = create_app(settings, config)
    except (ValueError, OSError) as exc:
        fail(str(exc), EXIT_CONFIG)
    # Forwarded headers are believed only from the trusted proxies, by the app itself (it
    # must still see the proxy's own address to trust its user header).
    uvicorn.run(app, host=host, port=port, proxy_headers=False, server_header=False,
                log_level="warning", access_log=False)


@console_app.command("add-user")
def add_user_command(
    name: Annotated[str, typer.Argument(help="User name (an email address fits).")],
    role: Annotated[str, typer.Option(
        "--role", help="operator (sees and acts) or viewer (sees only).")] = "viewer",
    users_file: Annotated[Path | None, typer.Option(
        "--users-file", help="The users file ($MF_CONSOLE_USERS_FILE).",
        show_default=False)] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from standard input (scripts).")] = False,
) -> None:
    """Add a console user (or replace their role and password) in the users file."""
    settings = build_settings()
    path = users_file or settings.plugin(ConsoleSettings).users_file
    if path is None:
        fail("give --users-file or set MF_CONSOLE_USERS_FILE", EXIT_CONFIG)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        from .users import add_user
    except ImportError as exc:
        fail(f"{_EXTRA} ({exc})", EXIT_CONFIG)
    try:
        new = add_user(path, name, role, password)  # type: ignore[arg-type]  # checked inside
    except (ValueError, OSError) as exc:
        fail(str(exc), EXIT_CONFIG)
    typer.echo(f"{'added' if new else 'updated'} {name} ({role}) in {path}")
