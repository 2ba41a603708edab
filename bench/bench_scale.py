"""Benchmark of the costs that must not grow with the history or the fleet (#16).

For each size N (default 10,000 and 1,000,000 projects) it builds, inside PostgreSQL with
``generate_series`` (triggers and foreign-key checks off during the load, secondary indexes
built afterwards, as a restore would):

* N active projects (N/5 owners in 20 time zones, N/1000 organisations, mixed cadences), each
  with its open pending queue item (metadata as the scheduler writes it), 1,000 of them due;
* ``--history`` × N − N finished queue items (completed, cancelled, failed) and ``--history`` × N
  ``token_usage`` rows with their daily aggregate; so 10 million of each at a million projects.

Then it prints, beside the same figure at the first size and their ratio:

* **claim p50 / p99**: ``claim_due_items`` with limit 1 (one short transaction), 500 claims;
* **heartbeat HOT %**: share of 500 heartbeats (``extend_leases``) that were HOT updates
  (``pg_stat_user_tables.n_tup_hot_upd``);
* **steady pass**: ``Scheduler.run_once`` with nothing changed (median of 5);
* **zone change**: the time-zone change of 1 % and then of 10 % of the owners (the ``UPDATE
  users`` with its change-log triggers) and the scheduler pass after each, with µs per changed
  project (linear means this stays flat from 1 % to 10 %);
* **scrape**: ``read_queue_depth`` (what ``/metrics`` reads), median of 5; and for reference
  the exact ``count(*) … GROUP BY status`` it no longer runs above 100,000 rows;
* **cost check**: what the limit check reads (the organisation's row of the daily aggregate
  and its limit), median of 50.

It creates a throwaway database ``mf_bench_scale_<random>`` per size on the server named by
``MF_BENCH_DATABASE_URL`` (a maintenance database URL; default ``postgresql:///postgres``) and
drops it at the end, also when a run fails. The load needs a superuser
(``session_replication_role``).
Figures only: nothing here asserts on time. About 10 minutes at a million projects on a 2-core
machine, most of it the load and its index builds.

    .venv/bin/python bench/bench_scale.py [--sizes 10000 1000000] [--history 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from mf_worker.db import connect, open_pool
from mf_worker.db.migrate import apply_migrations
from mf_worker.db.sql import load_queries
from mf_worker.logs import configure_logging
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.observability.queue_depth import read_queue_depth
from mf_worker.queue import store
from mf_worker.settings import Settings, load_settings

ZONES = ["UTC", "Europe/London", "Europe/Paris", "Europe/Berlin", "Europe/Helsinki",
         "Europe/Moscow", "Africa/Lagos", "Africa/Johannesburg", "Asia/Dubai", "Asia/Kolkata",
         "Asia/Kathmandu", "Asia/Shanghai", "Asia/Tokyo", "Australia/Sydney",
         "Pacific/Auckland", "America/Sao_Paulo", "America/New_York", "America/Chicago",
         "America/Denver", "America/Los_Angeles"]
CADENCES = ['{"mode": "daily"}', '{"mode": "weekdays"}', '{"mode": "weekly", "days": [1]}',
            '{"mode": "weekly", "days": [5]}', '{"mode": "custom", "days": [1, 3, 5]}',
            '{"mode": "custom", "days": [0, 3, 6]}']
SECONDARY_INDEXES = ("episode_schedule_queue", "token_usage")


def _with_database(url: str, dbname: str) -> str:
    return make_conninfo("", **{**conninfo_to_dict(url), "dbname": dbname})


def _settings(url: str) -> Settings:
    settings, _ = load_settings(environ={}, overrides={"database_url": url})
    return settings


def build(url: str, n: int, history: int) -> float:
    """Load the data set; returns the seconds it took."""
    started = time.perf_counter()
    users, orgs = max(n // 5, 20), max(n // 1000, 10)
    p = {"n": n, "users": users, "orgs": orgs, "zones": ZONES, "nz": len(ZONES),
         "cadences": CADENCES, "nc": len(CADENCES), "finished": (history - 1) * n,
         "usage": history * n, "due": 1000}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no triggers, no FK checks
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET synchronous_commit = off")
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            " AND tablename = ANY(%s) AND indexname NOT LIKE '%%_pkey'",
            [list(SECONDARY_INDEXES)]).fetchall()
        for name, _ in indexes:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        conn.execute("INSERT INTO organizations (id, name) SELECT 'org_' || o, 'Org ' || o"
                     " FROM generate_series(0, %(orgs)s - 1) o", p)
        conn.execute("INSERT INTO users (id, organization_id, email, timezone)"
                     " SELECT 'usr_' || u, 'org_' || u %% %(orgs)s, 'u' || u || '@example.com',"
                     "        (%(zones)s::text[])[u %% %(nz)s + 1]"
                     " FROM generate_series(0, %(users)s - 1) u", p)
        conn.execute("INSERT INTO projects (id, organization_id, user_id, title, cadence_config,"
                     "                      delivery_time)"
                     " SELECT 'prj_' || g, 'org_' || (g %% %(users)s) %% %(orgs)s,"
                     "        'usr_' || g %% %(users)s, 'Project ' || g,"
                     "        (%(cadences)s::jsonb[])[g %% %(nc)s + 1],"
                     "        make_time(g %% 24, (g * 7) %% 60, 0)"
                     " FROM generate_series(0, %(n)s - 1) g", p)
        # Each project's open item, as the scheduler writes it (so nothing is stale).
        conn.execute(
            "INSERT INTO episode_schedule_queue (id, project_id, organization_id, scheduled_for,"
            "                                    run_after, metadata)"
            " SELECT 'queue_o' || g, p.id, p.organization_id, s.at,"
            "        CASE WHEN g < %(due)s THEN now() - interval '1 minute'"
            "             ELSE s.at END,"
            "        jsonb_build_object('cadence', p.cadence_config, 'user_timezone',"
            "                           u.timezone, 'delivery_time', p.delivery_time::text,"
            "                           'user_local_time', s.at::text)"
            " FROM generate_series(0, %(n)s - 1) g"
            " JOIN projects p ON p.id = 'prj_' || g"
            " JOIN users u ON u.id = p.user_id,"
            " LATERAL (SELECT now() + interval '1 hour' + (g %% 7) * interval '1 day' AS at) s",
            p)
        conn.execute(
            "INSERT INTO episode_schedule_queue (id, project_id, organization_id, scheduled_for,"
            "    run_after, status, attempt_count, completed_at, finished_at, created_at,"
            "    updated_at, last_error)"
            " SELECT 'queue_h' || g, 'prj_' || g %% %(n)s,"
            "        'org_' || ((g %% %(n)s) %% %(users)s) %% %(orgs)s, t.at, t.at,"
            "        CASE WHEN g %% 10 < 8 THEN 'completed' WHEN g %% 10 = 8 THEN 'cancelled'"
            "             ELSE 'failed' END, 1,"
            "        CASE WHEN g %% 10 < 8 THEN t.at END, t.at, t.at, t.at,"
            "        CASE WHEN g %% 10 >= 8 THEN 'history' END"
            " FROM generate_series(0, %(finished)s - 1) g,"
            " LATERAL (SELECT now() - (g %% 40) * interval '1 day' - interval '1 hour' AS at) t",
            p)
        conn.execute(
            "INSERT INTO token_usage (id, organization_id, project_id, operation, model,"
            "    prompt_tokens, completion_tokens, cost_gbp, created_at, billing_date)"
            " SELECT 'tok_' || g, 'org_' || ((g %% %(n)s) %% %(users)s) %% %(orgs)s,"
            "        'prj_' || g %% %(n)s, 'episode_generation', 'gpt-4o', 1000, 200, 0.0012,"
            "        t.at, (t.at AT TIME ZONE 'UTC')::date"
            " FROM generate_series(0, %(usage)s - 1) g,"
            " LATERAL (SELECT now() - (g %% 40) * interval '1 day' AS at) t", p)
        conn.execute(
            "INSERT INTO token_usage_daily (organization_id, date, total_tokens, total_cost_gbp,"
            "                               episode_count)"
            " SELECT organization_id, billing_date, sum(total_tokens), sum(cost_gbp), count(*)"
            " FROM token_usage GROUP BY 1, 2")
        conn.execute("RESET session_replication_role")
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _hot(url: str) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                           " WHERE relname = 'episode_schedule_queue'").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def measure(url: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    settings = _settings(url)
    conn = await connect(settings)
    async with conn:
        # Claims, one at a time, each completed (not timed) so the next finds another.
        claims: list[float] = []
        rotation = store.OrganizationRotation()  # one process's claims take turns, as a worker's
        for _ in range(500):
            started = time.perf_counter()
            items = await store.claim_due_items(conn, worker="bench", limit=1, lease_seconds=60,
                                                rotation=rotation)
            claims.append(time.perf_counter() - started)
            if not items:
                raise RuntimeError("no due item left to claim")
            await store.complete_items(conn, items)
        out["claim p50 ms"] = statistics.median(claims) * 1000
        out["claim p99 ms"] = _pct(claims, 0.99) * 1000

        # Heartbeats: 50 claims, 10 beats each, one statement per beat as the daemon does.
        held = await store.claim_due_items(conn, worker="bench", limit=50, lease_seconds=60,
                                           rotation=rotation)
        await conn.execute("SELECT pg_stat_force_next_flush()")
        upd0, hot0 = await asyncio.to_thread(_hot, url)
        for _ in range(10):
            for item in held:
                await store.extend_leases(conn, [item], lease_seconds=60)
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")
        upd1, hot1 = await asyncio.to_thread(_hot, url)
        out["heartbeat HOT %"] = 100.0 * (hot1 - hot0) / max(upd1 - upd0, 1)
        await store.complete_items(conn, held)

        # /metrics and the cost check.
        scrapes = []
        for _ in range(5):
            started = time.perf_counter()
            await read_queue_depth(conn)
            scrapes.append(time.perf_counter() - started)
        out["scrape ms"] = statistics.median(scrapes) * 1000
        started = time.perf_counter()
        await (await conn.execute("SELECT status, count(*) FROM episode_schedule_queue"
                                  " GROUP BY status")).fetchall()
        out["exact count (old scrape) ms"] = (time.perf_counter() - started) * 1000
        # What the limit check reads (inside reserve_budget): the organisation's row of the
        # daily aggregate and its limit, never the raw usage rows.
        budget = load_queries("mf_worker.cost", "budget.sql")["read_daily_budget"]
        params = {"organization_id": "org_1", "date": datetime.now(UTC).date(),
                  "default_limit": Decimal(50)}
        checks = []
        for _ in range(50):
            started = time.perf_counter()
            await (await conn.execute(budget, params)).fetchone()
            checks.append(time.perf_counter() - started)
        out["cost check ms"] = statistics.median(checks) * 1000

    pool = await open_pool(settings, max_size=2)
    try:
        scheduler = Scheduler(pool, SchedulerConfig(interval=30.0))
        # The claims above ended 550 items without a next one: the first pass plans them.
        started = time.perf_counter()
        catch_up = await scheduler.run_once(sweep=False)
        out["catch-up pass s"] = time.perf_counter() - started
        out["catch-up projects"] = catch_up.examined
        steadies = []
        for _ in range(5):
            started = time.perf_counter()
            result = await scheduler.run_once(sweep=False)
            steadies.append(time.perf_counter() - started)
            if result.examined:
                raise RuntimeError(f"steady pass examined {result.examined} projects")
        out["steady pass ms"] = statistics.median(steadies) * 1000
        out["steady pass min ms"] = min(steadies) * 1000

        # A bulk change of 1 % and then of 10 % of the owners' zones: linear in the rows changed
        # means the cost per changed project stays flat from one to the other (and from one
        # size to the next, while the rows touched fit in PostgreSQL's shared buffers).
        for label, modulo in (("zone 1 %", 100), ("zone", 10)):
            async with pool.connection() as pconn:
                started = time.perf_counter()
                await pconn.execute(
                    "UPDATE users SET timezone = CASE timezone WHEN 'Asia/Tokyo' THEN 'Asia/Seoul'"
                    " ELSE 'Asia/Tokyo' END WHERE hashtext(id) %% %s = 1", [modulo])
                out[f"{label} UPDATE s"] = time.perf_counter() - started
            started = time.perf_counter()
            moved = await scheduler.run_once(sweep=False)
            seconds = time.perf_counter() - started
            out[f"{label} pass s"] = seconds
            out[f"{label} projects"] = moved.examined
            out[f"{label} pass µs/project"] = seconds / max(moved.examined, 1) * 1e6
            if moved.rescheduled < moved.examined * 0.9:
                raise RuntimeError(f"{label} change pass did {moved}")
    finally:
        await pool.close()
    return out


async def migrate(url: str) -> None:
    conn = await connect(_settings(url))
    async with conn:
        await apply_migrations(conn)


ORDER = [("claim p50 ms", "≤ 1.5×"), ("claim p99 ms", ""), ("heartbeat HOT %", "≥ 80 %"),
         ("steady pass ms", "≤ 2×"), ("steady pass min ms", ""), ("catch-up projects", ""),
         ("catch-up pass s", ""),
         ("zone 1 % projects", ""), ("zone 1 % pass s", ""),
         ("zone 1 % pass µs/project", "flat"),
         ("zone projects", ""), ("zone UPDATE s", ""), ("zone pass s", "linear"),
         ("zone pass µs/project", "flat"), ("scrape ms", "≤ 2×"),
         ("exact count (old scrape) ms", "reference"), ("cost check ms", ""),
         ("load s", "")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--history", type=int, default=10,
                        help="queue and usage rows per project (default 10)")
    args = parser.parse_args(argv)
    if args.history < 1 or any(n < 1000 for n in args.sizes):
        parser.error("sizes must be at least 1000 and --history positive")
    configure_logging("console", "warning")
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")
    results: dict[int, dict[str, Any]] = {}
    for n in args.sizes:
        name = f"mf_bench_scale_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = _with_database(admin_url, name)
        try:
            asyncio.run(migrate(url))
            load = build(url, n, args.history)
            print(f"{n:,} projects, {args.history * n:,} queue rows and usage rows: "
                  f"loaded in {load:.0f} s", flush=True)
            results[n] = {**asyncio.run(measure(url, n)), "load s": load}
        finally:
            with psycopg.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                              .format(sql.Identifier(name)))
    sizes = list(results)
    base = sizes[0]
    header = f"{'figure':<28}" + "".join(f"{n:>14,}" for n in sizes) + f"{'ratio':>9}  target"
    print(header)
    print("-" * len(header))
    for key, target in ORDER:
        values = [results[n][key] for n in sizes]
        ratio = values[-1] / values[0] if values[0] else float("nan")
        cells = "".join(f"{v:>14,.3f}" if isinstance(v, float) else f"{v:>14,}" for v in values)
        print(f"{key:<28}{cells}{ratio:>8.2f}×  {target}" if len(sizes) > 1 and base != sizes[-1]
              else f"{key:<28}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
