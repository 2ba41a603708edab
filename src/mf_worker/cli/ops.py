"""Operators' commands: migrate, config, run, run-once, schedule, enqueue, status, retry,
cancel and memories migrate."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import psycopg
import typer
from psycopg_pool import PoolTimeout

from ..audit import default_actor, validate_actor
from ..daemon import Components, build, run_one, serve, shutdown
from ..db import Connection, Pool, open_pool
from ..db.migrate import apply_migrations, load_migrations, migration_status
from ..engine.worker import Outcome
from ..logs import get_logger, mask
from ..maintenance.scheduler import Scheduler, SchedulerConfig
from ..memories import TRIGGER_MEMORIES, ProjectReport, migrate_memories, render_report
from ..scheduling.scheduler import (
    InstantOutOfRange,
    SchedulerResult,
    check_instant,
    enqueue_item,
)
from ..settings import Settings, describe_settings
from ..status import Snapshot, cancel_queue_item, read_snapshot, render_snapshot, retry_queue_item
from .common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NOTHING_TO_DO,
    Actor,
    Concurrency,
    DatabaseUrl,
    GeneratorOpt,
    LogFormat,
    LogLevel,
    app,
    build_settings,
    connect_error,
    database,
    fail,
    run_async,
)


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
        async with database(settings) as conn:
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


async def _print_migration_status(conn: Connection) -> None:
    st = await migration_status(conn)
    applied_at = {a.version: a.applied_at for a in st.applied}
    for migration in load_migrations():
        when = applied_at.get(migration.version)
        state = f"applied {when:%Y-%m-%d %H:%M:%S%z}" if when else "pending"
        if migration in st.modified:
            state += " (file changed since it was applied)"
        typer.echo(f"{migration.label:40} {state}")
    for unknown in st.unknown:
        typer.echo(f"{unknown.version:04d}_{unknown.name:35} applied, unknown to this version")
    typer.echo(f"{len(st.applied)} applied, {len(st.pending)} pending")


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="The reference table of all settings (README).")
    ] = False,
) -> None:
    """Show every setting: its variable, effective value (secrets masked, URLs without their
    password) and meaning."""
    if markdown:
        typer.echo(settings_markdown_table())
        return
    settings = build_settings()
    rows = []
    for info in describe_settings():
        rows.append({"variable": info.env, "value": info.shown_in(settings),
                     "default": mask(info.default), "doc": info.doc})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.echo(f"{row['variable']:24} = {row['value']!s:30} {row['doc']}")



async def _components(settings: Settings, **kwargs: Any) -> Components:
    try:
        return await build(settings, **kwargs)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise connect_error(exc) from None


@app.command()
def run(
    concurrency: Concurrency = None,
    generator: GeneratorOpt = None,
    burst: Annotated[
        bool, typer.Option("--burst", help="Exit once nothing is due and nothing is in flight.")
    ] = False,
    poll_interval: Annotated[
        float | None, typer.Option("--poll-interval", help="Seconds ($MF_POLL_INTERVAL).")
    ] = None,
    database_url: DatabaseUrl = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Run the daemon: scheduler, workers, heartbeat, reaper and pruner, until SIGTERM."""
    settings = build_settings(
        concurrency=concurrency, generator=generator, poll_interval=poll_interval,
        database_url=database_url, log_format=log_format, log_level=log_level,
    )

    async def main() -> int:
        return await serve(await _components(settings), burst=burst)

    raise typer.Exit(run_async(main))


@app.command("run-once")
def run_once(
    item_id: Annotated[
        str | None,
        typer.Option("--id", help="Process this pending item, even if it is not due yet."),
    ] = None,
    generator: GeneratorOpt = None,
    database_url: DatabaseUrl = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Claim one due item and process it in the foreground (exit 0 ok, 1 failed, 3 none due)."""
    settings = build_settings(
        generator=generator, database_url=database_url, log_format=log_format,
        log_level=log_level,
    )

    async def main() -> Outcome | None:
        components = await _components(settings, scheduler=False)
        try:
            return await run_one(components, item_id)
        finally:
            await shutdown(components)

    outcome = run_async(main)
    if outcome is None:
        typer.echo("nothing due")
        raise typer.Exit(EXIT_NOTHING_TO_DO)
    typer.echo(outcome.value)
    raise typer.Exit(0 if outcome is Outcome.SUCCESS else EXIT_FAILED)


@app.command()
def schedule(
    database_url: DatabaseUrl = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Run one full scheduler pass (a sweep of every project): give every active project its
    next item; report invalid ones. A replica's pass in progress is waited for (one pass at a
    time per fleet)."""
    settings = build_settings(database_url=database_url, log_format=log_format,
                              log_level=log_level)

    async def main() -> SchedulerResult:
        pool = await _open_pool(settings)
        try:
            scheduler = Scheduler(pool, SchedulerConfig(interval=settings.scheduler_interval,
                                                         lead_seconds=settings.lead_seconds))
            return await scheduler.run_once(sweep=True, wait=True)
        finally:
            await pool.close()

    result = run_async(main)
    typer.echo(f"created {result.created}, rescheduled {result.rescheduled}, "
               f"cancelled {result.cancelled}, invalid {len(result.invalid)}")
    for project_id, error in sorted(result.invalid.items()):
        typer.echo(f"  project {project_id}: {error}")


async def _open_pool(settings: Settings) -> Pool:
    try:
        return await open_pool(settings, max_size=2)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise connect_error(exc) from None


@app.command()
def enqueue(
    project_id: Annotated[str, typer.Argument(help="The project to add an item for.")],
    at: Annotated[
        str | None, typer.Option("--at", help="ISO 8601 instant with offset, from 2000 to a "
                                 "year ahead (default: now).")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Cancel the project's waiting item first.")
    ] = False,
    actor: Actor = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add an extra item for a project, now or at a given time (support and debugging)."""
    settings = build_settings(database_url=database_url)
    when = _parse_instant(at) if at else None
    who = _actor(actor)

    async def main() -> tuple[str, datetime]:
        async with database(settings) as conn:
            return await enqueue_item(conn, project_id, at=when, replace=replace,
                                      now=datetime.now(UTC), actor=who,
                                      lead_seconds=settings.lead_seconds)

    item_id, due = run_async(main)
    typer.echo(f"enqueued {item_id} for {project_id}, due {due.isoformat()}")


def _actor(flag: str | None) -> str:
    """``--actor`` checked, else the OS user: who an operator command is audited under."""
    if flag is None:
        return default_actor()
    try:
        return validate_actor(flag)
    except ValueError as exc:
        fail(f"--actor={flag!r}: {exc}", EXIT_CONFIG)


def _parse_instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--at={text!r}: not an ISO 8601 date-time", EXIT_CONFIG)
    if value.tzinfo is None:
        fail(f"--at={text!r}: give an offset or Z (e.g. 2026-01-05T09:00:00Z)", EXIT_CONFIG)
    try:
        # Not before 2000, at most a year ahead: year 1 in Europe/London overflowed the zone
        # arithmetic (a traceback), and a daemon could not claim an item due before year 1.
        check_instant(value, datetime.now(UTC), name=f"--at={text!r}")
    except InstantOutOfRange as exc:
        fail(str(exc), EXIT_CONFIG)
    return value


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Queue depth by status, lag, expired leases, failed and blocked items with errors."""
    settings = build_settings(database_url=database_url)

    async def main() -> Snapshot:
        async with database(settings) as conn:
            return await read_snapshot(conn, default_limit_gbp=settings.daily_cost_limit_gbp)

    snapshot = run_async(main)
    typer.echo(json.dumps(snapshot.to_json(), indent=2) if as_json
               else render_snapshot(snapshot))


@app.command()
def retry(
    item_id: Annotated[str, typer.Argument(help="Queue item id (queue_…).")],
    actor: Actor = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make a failed, cancelled or blocked item pending and due now, with a fresh start:
    attempts, retry deadline, backoff and lost-worker count."""
    settings = build_settings(database_url=database_url)
    who = _actor(actor)

    async def main() -> None:
        async with database(settings) as conn:
            await retry_queue_item(conn, item_id, actor=who)

    run_async(main)
    typer.echo(f"{item_id} is pending and due now, with a fresh start: attempts, retry "
               "deadline (MF_RETRY_DEADLINE from its next pick-up), backoff and lost-worker "
               "count reset")


@app.command()
def cancel(
    item_id: Annotated[str, typer.Argument(help="Queue item id (queue_…).")],
    reason: Annotated[str, typer.Option(
        "--reason", help="Recorded as last_error, and on the episode an attempt started."
    )] = "cancelled by an operator",
    actor: Actor = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Cancel a pending, blocked or processing item (the project's next one follows)."""
    settings = build_settings(database_url=database_url)
    who = _actor(actor)

    async def main() -> None:
        async with database(settings) as conn:
            await cancel_queue_item(conn, item_id, reason, actor=who)

    run_async(main)
    typer.echo(f"{item_id} cancelled")


memories_app = typer.Typer(help="The agent's memories: migrate projects.memories (JSON) into "
                                "agent_memory.", no_args_is_help=True)
app.add_typer(memories_app, name="memories")


@memories_app.command("migrate")
def memories_migrate(
    project: Annotated[str | None, typer.Option(
        "--project", help="Only this project (default: every project with enough memories).",
        show_default=False)] = None,
    min_count: Annotated[int | None, typer.Option(
        "--min-count", help=f"Projects with at least this many entries (default "
        f"{TRIGGER_MEMORIES}, the seed's trigger; 1 with --project).", show_default=False,
    )] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Report what would be copied; write nothing.")] = False,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Memories per transaction.")] = 500,
    max_batches: Annotated[int | None, typer.Option(
        "--max-batches", help="Stop after this many batches (run it in slices; the next run "
        "resumes).", show_default=False)] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Copy projects.memories entries into agent_memory, acting for each organisation.
    Idempotent: a second run (or one after an interruption) copies nothing twice."""
    settings = build_settings(database_url=database_url)
    minimum = min_count if min_count is not None else (1 if project else TRIGGER_MEMORIES)
    for flag, value in (("--min-count", minimum), ("--batch-size", batch_size),
                        ("--max-batches", max_batches)):
        if value is not None and value < 1:
            fail(f"{flag}={value}: must be at least 1", EXIT_CONFIG)

    def show(report: ProjectReport) -> None:
        for line in render_report(report, dry_run=dry_run):
            typer.echo(line)

    async def main() -> list[ProjectReport]:
        async with database(settings) as conn:
            return await migrate_memories(
                conn, project_id=project, min_count=minimum, dry_run=dry_run,
                batch_size=batch_size, max_batches=max_batches, on_report=show)

    reports = run_async(main)
    verb = "to copy" if dry_run else "copied"
    total = sum(r.to_copy if dry_run else r.copied for r in reports)
    typer.echo(f"{len(reports)} projects: {total} memories {verb}, "
               f"{sum(r.already for r in reports)} already there, "
               f"{sum(len(r.skipped) for r in reports)} skipped")




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

