"""Benchmark of the scheduler pass (``Scheduler.run_once``) on a real PostgreSQL server.

What it measures, for each size N:

* **first pass**: N active projects with no queue items; one pass plans and inserts N items
  (keyset-paginated batches of ``BATCH_SIZE``: list projects without an open item, compute each
  next occurrence in Python, bulk-insert with ``ON CONFLICT DO NOTHING``, refresh the
  ``projects.next_scheduled_at`` cache). Reported as seconds and items per second.
* **steady pass**: the same N projects, each already with its open item; one pass finds nothing
  to cancel, reschedule or create. This is what the fleet pays every ``MF_SCHEDULER_INTERVAL``
  seconds (one replica, through the advisory lock): it reads the change log (empty here), so it
  should not grow with N.
* **sweep**: the full pass over every project (the safety net, hourly by default, and
  ``mf-worker schedule``), finding nothing to do.

Each figure is the median of ``--repeat`` runs; the queue is emptied (and the cache reset)
between first-pass runs. The projects are seeded with one ``INSERT … SELECT generate_series``:
a mix of daily / weekdays / weekly / custom cadences, delivery times spread over the day, and
owners in 20 time zones (so the zone cache and DST handling are exercised as in production).

It creates a throwaway database ``mf_bench_sched_<random>`` on the server named by
``MF_BENCH_DATABASE_URL`` (a maintenance database URL; default ``postgresql:///postgres``),
migrates it with the package's migrations and drops it at the end. Figures only: nothing here
asserts on time, which depends on the machine.

    .venv/bin/python bench/bench_scheduler.py [--sizes 10000 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mf_worker.db import Pool, connect, open_pool
from mf_worker.db.migrate import apply_migrations
from mf_worker.logs import configure_logging
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.scheduling.scheduler import BATCH_SIZE
from mf_worker.settings import Settings, load_settings

ZONES = [
    "UTC",
    "Europe/London",
    "Europe/Paris",
    "Europe/Berlin",
    "Europe/Helsinki",
    "Europe/Moscow",
    "Africa/Lagos",
    "Africa/Johannesburg",
    "Asia/Dubai",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Shanghai",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Australia/Adelaide",
    "Pacific/Auckland",
    "America/Sao_Paulo",
    "America/New_York",
    "America/Chicago",
    "America/Los_Angeles",
]
CADENCES = [
    '{"mode": "daily", "days": []}',
    '{"mode": "weekdays", "days": []}',
    '{"mode": "weekly", "days": [1]}',
    '{"mode": "weekly", "days": [5, 2]}',
    '{"mode": "custom", "days": [0, 3, 6]}',
]
ORGS = 50
USERS_PER_ORG = 20  # 1,000 owners, zone = ZONES[user number % 20]


def _with_database(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def _settings(url: str) -> Settings:
    settings, _ = load_settings(environ={}, overrides={"database_url": url})
    return settings


def seed(url: str, size: int) -> None:
    """Replace every tenant with ORGS organisations, their users and ``size`` projects."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE organizations CASCADE")
        conn.execute(
            "INSERT INTO organizations (id, name)"
            " SELECT 'org_b' || lpad(o::text, 4, '0'), 'Bench org ' || o"
            " FROM generate_series(0, %s - 1) o",
            [ORGS],
        )
        conn.execute(
            "INSERT INTO users (id, organization_id, email, timezone)"
            " SELECT 'usr_b' || lpad(u::text, 6, '0'), 'org_b' || lpad((u %% %s)::text, 4, '0'),"
            "        'bench' || u || '@example.com', (%s::text[])[u %% %s + 1]"
            " FROM generate_series(0, %s - 1) u",
            [ORGS, ZONES, len(ZONES), ORGS * USERS_PER_ORG],
        )
        # Project g belongs to user g % users, hence to that user's organisation.
        conn.execute(
            "INSERT INTO projects (id, organization_id, user_id, title, cadence_config,"
            "                      delivery_time)"
            " SELECT 'prj_b' || lpad(g::text, 8, '0'),"
            "        'org_b' || lpad(((g %% %(users)s) %% %(orgs)s)::text, 4, '0'),"
            "        'usr_b' || lpad((g %% %(users)s)::text, 6, '0'),"
            "        'Bench project ' || g,"
            "        (%(cadences)s::jsonb[])[g %% %(n_cadences)s + 1],"
            "        make_time(g %% 24, (g * 7) %% 60, 0)"
            " FROM generate_series(0, %(size)s - 1) g",
            {
                "users": ORGS * USERS_PER_ORG,
                "orgs": ORGS,
                "cadences": CADENCES,
                "n_cadences": len(CADENCES),
                "size": size,
            },
        )
        conn.execute("VACUUM ANALYZE organizations, users, projects")


def reset_queue(url: str) -> None:
    """Back to "no project has an item": empty queue, empty cache, fresh statistics."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE episode_schedule_queue, scheduler_project_changes")
        conn.execute(
            "UPDATE projects SET next_scheduled_at = NULL WHERE next_scheduled_at IS NOT NULL"
        )
        conn.execute("VACUUM ANALYZE projects, episode_schedule_queue")


def count_open(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM episode_schedule_queue WHERE status = 'pending'"
        ).fetchone()
    return int(row[0]) if row else 0


async def _timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await action()
    return time.perf_counter() - start, result


async def measure(url: str, size: int, repeat: int) -> tuple[float, float, float]:
    """Median seconds of a first pass, a steady pass and a sweep over ``size`` projects."""
    pool: Pool = await open_pool(_settings(url), max_size=2)
    try:
        scheduler = Scheduler(pool, SchedulerConfig(interval=1.0))
        firsts = []
        for _ in range(repeat):
            await asyncio.to_thread(reset_queue, url)
            seconds, result = await _timed(lambda: scheduler.run_once(sweep=True))
            if result.created != size or result.invalid:
                raise RuntimeError(f"first pass over {size} projects did {result}")
            firsts.append(seconds)
        if await asyncio.to_thread(count_open, url) != size:
            raise RuntimeError("the queue does not hold one item per project")
        # Let autovacuum's job happen now, as it would between real passes.
        await asyncio.to_thread(_analyze_queue, url)
        figures: dict[bool, list[float]] = {False: [], True: []}
        for sweep in (False, True):
            for _ in range(repeat):
                seconds, result = await _timed(functools.partial(scheduler.run_once, sweep=sweep))
                if result.created or result.rescheduled or result.cancelled:
                    raise RuntimeError(f"steady pass over {size} projects did {result}")
                figures[sweep].append(seconds)
        return (statistics.median(firsts), statistics.median(figures[False]),
                statistics.median(figures[True]))
    finally:
        await pool.close()


def _analyze_queue(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE episode_schedule_queue, projects")


async def migrate(url: str) -> None:
    conn = await connect(_settings(url))
    async with conn:
        await apply_migrations(conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="numbers of active projects (default: 10000 100000)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or any(n < 1 for n in args.sizes):
        parser.error("sizes and --repeat must be positive")

    configure_logging("console", "warning")  # the scheduler's info lines would swamp the table
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")
    name = f"mf_bench_sched_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        server_version = admin.info.server_version
    url = _with_database(admin_url, name)
    try:
        asyncio.run(migrate(url))
        print(
            f"PostgreSQL {server_version // 10000}.{server_version % 10000}, "
            f"database {name}, batch size {BATCH_SIZE}, {len(ZONES)} zones, "
            f"median of {args.repeat} run(s)",
            flush=True,
        )
        header = (f"{'projects':>10}  {'first pass s':>12}  {'items/s':>10}  {'steady pass s':>13}"
                  f"  {'sweep s':>8}")
        print(header)
        print("-" * len(header), flush=True)
        for size in args.sizes:
            seed(url, size)
            first, steady, sweep = asyncio.run(measure(url, size, args.repeat))
            print(
                f"{size:>10,}  {first:>12.3f}  {size / first:>10,.0f}  {steady:>13.4f}"
                f"  {sweep:>8.3f}", flush=True
            )
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
