"""Costs that do not grow with the history or the fleet (#16), proved by counts, never by times.

Each test states one behaviour: one scheduler pass per fleet (an advisory lock, and a pass per
interval), a steady pass that examines only the projects that changed (a change log kept by
triggers), heartbeats that are HOT updates, NOTIFY only for items due now, queue-depth metrics
that do not scan the history, and an index behind every cascade from a project. Figures for the
same behaviours at a million projects are printed by ``bench/bench_scale.py``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from mf_worker.db import open_pool
from mf_worker.db.sql import load_queries
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.observability.queue_depth import read_queue_depth
from mf_worker.scheduling import scheduler as scheduling
from mf_worker.scheduling.scheduler import SchedulerResult

from .conftest import settings_for
from .factories import make_org, make_project, make_queue_item, make_tenant, make_user

Conn = psycopg.Connection[dict[str, Any]]
NOW = datetime(2026, 3, 4, 12, 30, tzinfo=UTC)  # a Wednesday
OPEN = ("pending", "processing", "blocked")


def _pass(db_url: str, now: datetime = NOW, *, paced: bool = False,
          schedulers: int = 1) -> list[SchedulerResult]:
    """One pass by each of ``schedulers`` Scheduler objects (replicas), one after the other."""

    async def main() -> list[SchedulerResult]:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            results = []
            for _ in range(schedulers):
                s = Scheduler(pool, SchedulerConfig(interval=60.0))
                results.append(await (s.tick() if paced else s.run_once(now=now)))
            return results
        finally:
            await pool.close()

    return asyncio.run(main())


def _open_items(db: Conn) -> int:
    row = db.execute("SELECT count(*) AS n FROM episode_schedule_queue"
                     " WHERE status IN ('pending', 'processing', 'blocked')").fetchone()
    assert row is not None
    return int(row["n"])


def _changes(db: Conn) -> set[str]:
    return {r["project_id"] for r in
            db.execute("SELECT project_id FROM scheduler_project_changes").fetchall()}


# --------------------------------------------------------------------------- one pass per fleet


def test_a_scheduler_that_cannot_take_the_fleet_lock_skips_its_pass(db_url: str, db: Conn) -> None:
    """Two schedulers at once: the one holding the advisory lock plans; the other does nothing."""
    make_tenant(db)
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [scheduling.SCHEDULER_LOCK_KEY])
        (result,) = _pass(db_url)
        assert result.skipped
        assert _open_items(db) == 0
    (result,) = _pass(db_url)
    assert not result.skipped and result.created == 1


def test_replicas_run_one_paced_pass_per_interval(db_url: str, db: Conn) -> None:
    """Three replicas whose loops tick within one interval: the first plans, the others skip."""
    make_tenant(db)
    first, second, third = _pass(db_url, paced=True, schedulers=3)
    assert (first.skipped, second.skipped, third.skipped) == (False, True, True)
    assert first.created == 1 and _open_items(db) == 1


# --------------------------------------------------------------------------- O(changed) passes


def test_steady_pass_examines_only_the_projects_that_changed(db_url: str, db: Conn) -> None:
    """After the first (sweeping) pass, a pass looks at the change log only: a zone change of a
    user with two projects, a paused project and a cadence change are 4 projects examined out
    of 30, and the log is empty afterwards."""
    org = make_org(db)
    users = [make_user(db, org, timezone="Europe/London") for _ in range(10)]
    projects = [make_project(db, u) for u in users for _ in range(3)]
    (first,) = _pass(db_url)
    assert first.created == 30 and first.swept
    assert _changes(db) == set()

    mover = users[0]
    db.execute("UPDATE users SET timezone = 'Asia/Tokyo' WHERE id = %s", [mover["id"]])
    db.execute("DELETE FROM projects WHERE id = %s", [projects[3]["id"]])  # user 1 keeps 2
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [projects[6]["id"]])
    db.execute("UPDATE projects SET cadence_config = %s WHERE id = %s",
               [Jsonb({"mode": "weekly", "days": [5]}), projects[9]["id"]])
    db.execute("UPDATE projects SET title = 'renamed' WHERE id = %s", [projects[12]["id"]])
    assert _changes(db) == {projects[i]["id"] for i in (0, 1, 2, 6, 9)} - {projects[3]["id"]}

    (steady,) = _pass(db_url, NOW + timedelta(minutes=1))
    assert not steady.swept
    assert steady.examined == 5
    assert (steady.rescheduled, steady.cancelled) == (4, 2)  # 3 moved + cadence; pause + delete
    assert _changes(db) == set()
    (idle,) = _pass(db_url, NOW + timedelta(minutes=2))
    assert idle.examined == 0 and (idle.created, idle.rescheduled, idle.cancelled) == (0, 0, 0)


def test_an_item_that_ends_without_a_next_one_is_replanned_by_the_steady_pass(
    db_url: str, db: Conn
) -> None:
    """A failed item leaves its project without an open item: the queue's trigger logs the
    project at commit, and the next steady pass plans it. A completion that plans its next
    item in the same transaction logs nothing."""
    t = make_tenant(db)
    other = make_project(db, t["user"])
    _pass(db_url)
    db.execute("UPDATE episode_schedule_queue SET status = 'failed' WHERE project_id = %s",
               [t["project"]["id"]])
    with db.transaction():
        db.execute("UPDATE episode_schedule_queue SET status = 'completed', completed_at = now()"
                   " WHERE project_id = %s", [other["id"]])
        make_queue_item(db, other, scheduled_for=NOW + timedelta(days=1))
    assert _changes(db) == {t["project"]["id"]}
    (steady,) = _pass(db_url, NOW + timedelta(minutes=1))
    assert (steady.swept, steady.examined, steady.created) == (False, 1, 1)
    assert _open_items(db) == 2


# --------------------------------------------------------------------------- HOT heartbeats


def test_heartbeats_are_hot_updates(db: Conn) -> None:
    """No indexed column changes on a heartbeat, so at least 80 % of them are HOT
    (pg_stat_user_tables.n_tup_hot_upd: a count)."""
    t = make_tenant(db)
    for _ in range(20):  # other rows on the page, as in a real queue
        make_queue_item(db, make_project(db, t["user"]), status="completed",
                        completed_at=datetime.now(UTC))
    item = make_queue_item(db, t["project"], status="processing", locked_by="w1",
                           lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
                           claim_token=1)
    beats = 200
    q = load_queries("mf_worker.queue", "queries.sql")
    db.execute("SELECT pg_stat_force_next_flush()")
    before = _hot(db)
    for _ in range(beats):
        rows = db.execute(q["extend_leases"], {"ids": [item["id"]], "tokens": [1],
                                               "lease_seconds": 300, "now": None}).fetchall()
        assert rows == [{"claim_token": 1, "extended": True}]
    db.execute("SELECT pg_stat_force_next_flush()")
    after = _hot(db)
    assert after["upd"] - before["upd"] == beats
    assert after["hot"] - before["hot"] >= 0.8 * beats, (before, after)


def _hot(db: Conn) -> dict[str, int]:
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute("SELECT n_tup_upd AS upd, n_tup_hot_upd AS hot FROM pg_stat_user_tables"
                     " WHERE relname = 'episode_schedule_queue'").fetchone()
    assert row is not None
    return {"upd": int(row["upd"]), "hot": int(row["hot"])}


def test_finished_items_are_pruned_by_when_they_finished(db: Conn) -> None:
    """The pruner's column is set once, when an item reaches a final status, and not on later
    updates; updated_at still follows every update."""
    t = make_tenant(db)
    item = make_queue_item(db, t["project"])
    assert item["finished_at"] is None
    db.execute("UPDATE episode_schedule_queue SET status = 'cancelled' WHERE id = %s",
               [item["id"]])
    first = db.execute("SELECT finished_at FROM episode_schedule_queue WHERE id = %s",
                       [item["id"]]).fetchone()
    assert first is not None and first["finished_at"] is not None
    db.execute("UPDATE episode_schedule_queue SET last_error = 'x' WHERE id = %s", [item["id"]])
    again = db.execute("SELECT finished_at, updated_at FROM episode_schedule_queue"
                       " WHERE id = %s", [item["id"]]).fetchone()
    assert again is not None and again["finished_at"] == first["finished_at"]


# --------------------------------------------------------------------------- NOTIFY


def test_only_items_due_now_send_a_notification(db_url: str, db: Conn) -> None:
    """A committed future item wakes nobody; a due one does (one notification each commit)."""
    t = make_tenant(db)
    other = make_project(db, t["user"])
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN mf_worker_queue")
        make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) + timedelta(days=1))
        make_queue_item(db, other, scheduled_for=datetime.now(UTC) - timedelta(seconds=1))
        got = list(listener.notifies(timeout=1.0, stop_after=2))
    assert len(got) == 1


def test_retry_into_the_future_sends_no_notification(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    item = make_queue_item(db, t["project"], status="processing", locked_by="w",
                           lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
                           claim_token=7)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN mf_worker_queue")
        db.execute("UPDATE episode_schedule_queue SET status = 'pending', locked_by = NULL,"
                   " lease_expires_at = NULL, run_after = now() + interval '30 seconds'"
                   " WHERE id = %s", [item["id"]])
        db.execute("UPDATE episode_schedule_queue SET run_after = now() WHERE id = %s",
                   [item["id"]])
        got = list(listener.notifies(timeout=1.0, stop_after=2))
    assert len(got) == 1


# --------------------------------------------------------------------------- cheap metrics


def test_queue_depth_does_not_scan_the_history(db_url: str, db: Conn) -> None:
    """In-flight statuses and due items are counted through their partial indexes, the rest
    (pending grows with the projects, finished ones with the history) estimated from the
    planner's statistics: reading the depth starts no sequential scan of the queue, and the
    estimates are close to the truth."""
    org = make_org(db)
    user = make_user(db, org)
    db.execute(
        "INSERT INTO projects (id, organization_id, user_id, title)"
        " SELECT 'prj_' || g, %s, %s, 'p' FROM generate_series(1, 3000) g",
        [org["id"], user["id"]])
    db.execute(
        "INSERT INTO episode_schedule_queue (id, project_id, organization_id, scheduled_for,"
        " status, completed_at)"
        " SELECT 'queue_' || g, 'prj_' || g, %s, now() - interval '1 day',"
        "        CASE WHEN g <= 2000 THEN 'completed' WHEN g <= 2900 THEN 'cancelled'"
        "             ELSE 'pending' END, now()"
        " FROM generate_series(1, 3000) g", [org["id"]])
    db.execute("ANALYZE episode_schedule_queue")

    async def read() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(
                db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            return await read_queue_depth(conn, exact_below=0)

    db.execute("SELECT pg_stat_force_next_flush()")
    before = _seq_scans(db)
    depth = asyncio.run(read())
    db.execute("SELECT pg_stat_force_next_flush()")
    assert _seq_scans(db) == before
    assert depth["due_items"] == 100 and depth["counts"]["processing"] == 0
    assert abs(depth["counts"]["pending"] - 100) <= 50
    assert abs(depth["counts"]["completed"] - 2000) <= 100
    assert abs(depth["counts"]["cancelled"] - 900) <= 100


def test_queue_depth_reads_due_and_late_items_at_the_instant_it_is_given(
    db_url: str, db: Conn
) -> None:
    """Time is an input of the depth reading too: items due an hour from the database's clock
    are due (and late) at the instant passed in. The instant reaches the planner as a value,
    so it estimates the due range from the statistics (a guessed third of a million pending
    rows chose a parallel scan that cost 10 ms per scrape at a million projects)."""
    tenant = make_tenant(db)
    later = datetime.now(UTC) + timedelta(hours=1)
    make_queue_item(db, tenant["project"], scheduled_for=later)

    async def read(at: datetime) -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(
                db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            return await read_queue_depth(conn, now=at)

    assert asyncio.run(read(later - timedelta(minutes=1)))["due_items"] == 0
    depth = asyncio.run(read(later + timedelta(minutes=1)))
    assert depth["due_items"] == 1 and depth["late_items"] == 1
    assert 59 <= depth["oldest_due_age_seconds"] <= 61


def _seq_scans(db: Conn) -> int:
    # The reading connection flushes its statistics when it closes.
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute("SELECT seq_scan FROM pg_stat_user_tables"
                     " WHERE relname = 'episode_schedule_queue'").fetchone()
    assert row is not None
    return int(row["seq_scan"])


# --------------------------------------------------------------------------- cascades


def test_every_cascade_from_a_project_or_user_is_served_by_an_index(db: Conn) -> None:
    """Deleting a project or user finds its dependent rows through an index whose leading
    columns are the foreign key's, instead of scanning each table."""
    rows = db.execute("""
        SELECT c.conrelid::regclass::text AS tbl, c.conname,
               (SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_attribute a
                WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)) AS cols
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.confrelid IN ('projects'::regclass, 'users'::regclass)
          AND NOT EXISTS (
              SELECT 1 FROM pg_index i
              JOIN pg_attribute lead ON lead.attrelid = i.indrelid AND lead.attnum = i.indkey[0]
              WHERE i.indrelid = c.conrelid AND i.indpred IS NULL
                AND i.indkey[0] = ANY(c.conkey) AND lead.attname <> 'organization_id')
        ORDER BY 1, 2""").fetchall()
    assert rows == []
