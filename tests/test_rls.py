"""Row-level security isolates organisations for every non-owner role, including the worker's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row

from .conftest import ensure_cross_org_role
from .factories import make_episode, make_queue_item, make_tenant

Conn = psycopg.Connection[dict[str, Any]]

TENANT_TABLES = [
    "organizations", "users", "projects", "episodes", "blocks", "episode_schedule_queue",
    "token_usage", "token_usage_daily", "planning_notes", "agent_memory", "user_events",
    "audit_log", "chat_sessions", "chat_messages", "highlights", "cost_limit_trips",
    "memory_migrations",
]


@pytest.fixture
def app_role(db: Conn) -> Iterator[str]:
    """A fresh non-owner login role with ordinary table privileges (no BYPASSRLS)."""
    name = f"mf_test_app_{uuid.uuid4().hex[:10]}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS").format(
        sql.Identifier(name)))
    db.execute(sql.SQL(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}"
    ).format(sql.Identifier(name)))
    yield name
    db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def as_role(db_url: str, role: str) -> Conn:
    conn = psycopg.connect(db_url, autocommit=True, row_factory=dict_row)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    return conn


def count_visible(conn: Conn, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(table)))
    return int(row.fetchone()["n"])  # type: ignore[index]


def test_role_sees_only_its_organisations_rows_and_nothing_without_the_setting(
    db_url: str, db: Conn, app_role: str
) -> None:
    a, b = make_tenant(db), make_tenant(db)
    for tenant in (a, b):
        make_queue_item(db, tenant["project"])
        make_episode(db, tenant["project"])
    with as_role(db_url, app_role) as conn:
        for table in TENANT_TABLES:
            assert count_visible(conn, table) == 0, f"{table} visible without app.current_org_id"
        with conn.transaction():
            conn.execute("SELECT set_config('app.current_org_id', %s, true)", [a["org"]["id"]])
            orgs = conn.execute("SELECT id FROM organizations").fetchall()
            assert orgs == [{"id": a["org"]["id"]}]
            for table in ("users", "projects", "episodes", "episode_schedule_queue"):
                rows = conn.execute(
                    sql.SQL("SELECT DISTINCT organization_id FROM {}").format(
                        sql.Identifier(table))
                ).fetchall()
                assert rows == [{"organization_id": a["org"]["id"]}], table
        # SET LOCAL: the setting is gone with the transaction.
        assert count_visible(conn, "projects") == 0


def test_role_acting_for_one_org_cannot_write_another_orgs_row(
    db_url: str, db: Conn, app_role: str
) -> None:
    a, b = make_tenant(db), make_tenant(db)
    with as_role(db_url, app_role) as conn:
        with (
            pytest.raises(errors.InsufficientPrivilege, match="row-level security"),
            conn.transaction(),
        ):
            conn.execute("SELECT set_config('app.current_org_id', %s, true)", [a["org"]["id"]])
            conn.execute(
                "INSERT INTO episodes (project_id, organization_id, sequence_number)"
                " VALUES (%s, %s, 1)", [b["project"]["id"], b["org"]["id"]],
            )
        with conn.transaction():
            conn.execute("SELECT set_config('app.current_org_id', %s, true)", [a["org"]["id"]])
            updated = conn.execute(
                "UPDATE projects SET title = 'hijacked' WHERE id = %s", [b["project"]["id"]]
            ).rowcount
        assert updated == 0
    assert db.execute("SELECT title FROM projects WHERE id = %s",
                      [b["project"]["id"]]).fetchone()["title"] != "hijacked"  # type: ignore[index]


def test_cross_org_member_reaches_the_queue_but_not_tenant_content(
    db_url: str, db: Conn, app_role: str
) -> None:
    """The worker's role (member of mf_cross_org) claims across orgs; content stays per org."""
    ensure_cross_org_role(db)
    db.execute(sql.SQL("GRANT mf_cross_org TO {}").format(sql.Identifier(app_role)))
    a, b = make_tenant(db), make_tenant(db)
    for tenant in (a, b):
        make_queue_item(db, tenant["project"])
        make_episode(db, tenant["project"])
    with as_role(db_url, app_role) as conn:
        assert count_visible(conn, "episode_schedule_queue") == 2
        assert count_visible(conn, "projects") == 2
        assert count_visible(conn, "users") == 2
        assert count_visible(conn, "episodes") == 0
        assert count_visible(conn, "planning_notes") == 0
        with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(
                "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
                " completion_tokens, cost_gbp) VALUES (%s, 'chat', 'm', 1, 1, 0)",
                [a["org"]["id"]],
            )


def test_provider_limits_are_fleet_wide_for_the_worker_and_hidden_from_everyone_else(
    db_url: str, db: Conn, app_role: str
) -> None:
    """The limiter's rows belong to no organisation: a role acting for one sees and writes
    none of them; a member of mf_cross_org (the worker) reads and writes them all."""
    db.execute("INSERT INTO provider_limits (limit_key, refilled_at) VALUES ('k', now())")
    with as_role(db_url, app_role) as conn:
        conn.execute("SELECT set_config('app.current_org_id', 'org_x', false)")
        assert count_visible(conn, "provider_limits") == 0
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO provider_limits (limit_key, refilled_at)"
                         " VALUES ('mine', now())")
    ensure_cross_org_role(db)
    db.execute(sql.SQL("GRANT mf_cross_org TO {}").format(sql.Identifier(app_role)))
    with as_role(db_url, app_role) as conn:
        assert count_visible(conn, "provider_limits") == 1
        conn.execute("UPDATE provider_limits SET cooldown_until = now(),"
                     " cooldown_reason = 'rate_limited'")
        conn.execute("INSERT INTO provider_limits (limit_key, refilled_at) VALUES ('k2', now())")
        assert count_visible(conn, "provider_limits") == 2


def test_usage_insert_as_org_moves_the_aggregate_under_rls(
    db_url: str, db: Conn, app_role: str
) -> None:
    """The aggregate trigger works for a non-owner role acting for its org."""
    a = make_tenant(db)
    with as_role(db_url, app_role) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.current_org_id', %s, true)", [a["org"]["id"]])
        conn.execute(
            "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
            " completion_tokens, cost_gbp) VALUES (%s, 'episode_generation', 'm', 7, 3, 0.25)",
            [a["org"]["id"]],
        )
    row = db.execute("SELECT total_tokens, episode_count FROM token_usage_daily").fetchone()
    assert row == {"total_tokens": 10, "episode_count": 1}


def test_the_whole_engine_runs_under_the_documented_least_privilege_role(
    worker_role_url: str, db: Conn
) -> None:
    """docs/database-roles.sql applied with psql; the scheduler, claims, the final write, the
    reaper and the budget all work as that role (no superuser, no BYPASSRLS, not the owner)."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from psycopg.conninfo import conninfo_to_dict

    from mf_worker import flow, queue
    from mf_worker.db import open_pool
    from mf_worker.maintenance.publisher import Publisher
    from mf_worker.maintenance.reaper import Reaper, ReaperConfig
    from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig

    from .conftest import settings_for
    from .factories import make_note
    from .workers import run_burst

    as_worker = worker_role_url
    role = conninfo_to_dict(as_worker)["user"]
    tenants = [make_tenant(db) for _ in range(3)]
    for t in tenants:
        make_note(db, t["project"])

    async def schedule_and_reap() -> None:
        pool = await open_pool(settings_for(as_worker), max_size=2)
        try:
            result = await Scheduler(pool, SchedulerConfig(interval=1.0)).run_once()
            assert result.created == 3 and not result.invalid
            async with pool.connection() as conn:
                await conn.execute("UPDATE episode_schedule_queue SET run_after = now()")
                claimed = await queue.claim_due_items(conn, worker="ghost", limit=1,
                                                      lease_seconds=60)
                assert len(claimed) == 1
                await conn.execute(
                    "UPDATE episode_schedule_queue SET lease_expires_at = now()"
                    " - interval '1 s' WHERE locked_by = 'ghost'")
            reaped = await Reaper(pool, ReaperConfig(lease_seconds=60, max_attempts=3)).run_once()
            assert [r.status for r in reaped] == ["pending"]
            async with pool.connection() as conn:  # the fleet-wide provider limiter
                limits = flow.Limits(requests_per_minute=60)
                assert (await flow.acquire(conn, "k", limits=limits)).granted
                hold = await flow.cool_down(conn, "k", seconds=1, reason="rate_limited")
                assert hold.started
        finally:
            await pool.close()

    asyncio.run(schedule_and_reap())
    reports = run_burst(as_worker, generator="template")
    assert [r.outcome.value for r in reports] == ["success"] * 3
    # Planned ahead, generated in their lead window: scheduled until the instant, when the
    # publisher (as the same role) makes them ready.
    assert db.execute("SELECT count(*) AS n FROM episodes WHERE status = 'scheduled'"
                      ).fetchone() == {"n": 3}

    async def publish() -> int:
        pool = await open_pool(settings_for(as_worker), max_size=2)
        try:
            latest = db.execute("SELECT max(scheduled_for) AS at FROM episode_schedule_queue"
                                " WHERE delivery = 'scheduled'").fetchone()
            assert latest is not None
            return len((await Publisher(pool).run_once(now=latest["at"])).published)
        finally:
            await pool.close()

    assert asyncio.run(publish()) == 3
    assert db.execute("SELECT count(*) AS n FROM episodes WHERE status = 'ready'"
                      ).fetchone() == {"n": 3}
    assert db.execute("SELECT count(*) AS n FROM planning_notes"
                      " WHERE status = 'incorporated'").fetchone() == {"n": 3}
    assert db.execute("SELECT count(*) AS n FROM episode_schedule_queue"
                      " WHERE status = 'pending' AND scheduled_for > %s",
                      [datetime.now(UTC) - timedelta(minutes=1)]).fetchone() == {"n": 3}
    assert db.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s",
                      [role]).fetchone() == {"rolsuper": False, "rolbypassrls": False}


def test_status_and_notification_retries_work_under_the_least_privilege_role(
    db_url: str, worker_role_url: str, db: Conn
) -> None:
    """As the documented worker role (cross-organisation reads, no tenant content): status sees
    which projects' memories were migrated (by the owner), and the budget loop re-sends a trip
    whose notification failed (no address needed: the `email` notifier reads them as the mail
    role, tests/test_tenancy.py)."""
    import asyncio
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from psycopg.types.json import Jsonb

    from mf_worker.cost.budget import Trip
    from mf_worker.db import open_pool
    from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop
    from mf_worker.memories import migrate_memories
    from mf_worker.status import read_snapshot

    from .conftest import settings_for

    as_worker = worker_role_url
    sent: list[Trip] = []

    class Recorder:
        async def notify(self, trip: Trip) -> None:
            sent.append(trip)

    migrated = make_tenant(db, memories=Jsonb([f"m{i}" for i in range(60)]))
    waiting = make_tenant(db, memories=Jsonb([f"m{i}" for i in range(51)]))
    org = migrated["org"]["id"]
    db.execute("INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp,"
               " next_notify_at) VALUES (%s, current_date, 5, 5, now() - interval '1 s')",
               [org])

    async def as_the_worker() -> dict[str, Any]:
        # The one-off migration runs as the schema owner, like `mf-worker migrate`.
        owner = await open_pool(settings_for(db_url), max_size=2)
        try:
            async with owner.connection() as conn:
                await migrate_memories(conn, project_id=migrated["project"]["id"],
                                       min_count=1, dry_run=False)
        finally:
            await owner.close()
        pool = await open_pool(settings_for(as_worker), max_size=2)
        try:
            async with pool.connection() as conn:
                snapshot = await read_snapshot(conn, default_limit_gbp=Decimal(50))
            loop = BudgetLoop(pool, BudgetConfig(policy="resume", default_limit=Decimal(50),
                                             reserve_per_item=Decimal("0.5"), interval=60),
                              notifier=Recorder())
            await loop.run_once(datetime.now(UTC) + timedelta(seconds=1))
            return snapshot.memory_migration
        finally:
            await pool.close()

    memory = asyncio.run(as_the_worker())
    assert [p["project_id"] for p in memory["projects"]] == [waiting["project"]["id"]]
    assert [(t.organization_id, t.spent_gbp) for t in sent] == [(org, Decimal(5))]
    trip = db.execute("SELECT notified_at FROM cost_limit_trips").fetchone()
    assert trip is not None and trip["notified_at"] is not None
