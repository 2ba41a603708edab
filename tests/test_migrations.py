"""Migrations: applied by the real CLI, idempotent, and safe when replicas race to apply them."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from mf_worker.db.migrate import load_migrations

EXPECTED_TABLES = {
    "organizations", "users", "projects", "episodes", "blocks", "episode_schedule_queue",
    "token_usage", "token_usage_daily", "planning_notes", "agent_memory", "user_events",
    "audit_log", "chat_sessions", "chat_messages", "highlights", "mf_schema_migrations",
    "cost_limit_trips", "memory_migrations", "scheduler_project_changes", "scheduler_state",
    "provider_limits",
}


def cli(*args: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    environ.pop("DATABASE_URL", None)
    environ.update({"MF_DATABASE_URL": url, "MF_LOG_FORMAT": "json", **env})
    return subprocess.run(
        [sys.executable, "-m", "mf_worker", *args],
        capture_output=True, text=True, env=environ, timeout=120, check=False,
    )


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrate_creates_every_table_then_reports_nothing_pending(empty_db_url: str) -> None:
    first = cli("migrate", url=empty_db_url)
    assert first.returncode == 0, first.stderr
    assert [line for line in first.stdout.splitlines()] == [
        f"applied {m.label}" for m in load_migrations()]
    assert tables(empty_db_url) == EXPECTED_TABLES

    second = cli("migrate", url=empty_db_url)
    assert second.returncode == 0, second.stderr
    assert "nothing to apply" in second.stdout

    status = cli("migrate", "--status", url=empty_db_url)
    assert status.returncode == 0, status.stderr
    for migration in load_migrations():
        assert migration.label in status.stdout
    assert f"{len(load_migrations())} applied, 0 pending" in status.stdout


def test_migrate_status_lists_pending_on_an_empty_database(empty_db_url: str) -> None:
    status = cli("migrate", "--status", url=empty_db_url)
    assert status.returncode == 0, status.stderr
    assert "0001_initial_schema" in status.stdout and "pending" in status.stdout
    assert tables(empty_db_url) == set(), "--status must not change the database"


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # racing processes: off the lease tests' cores
def test_two_racing_migrate_processes_both_succeed_and_apply_once(empty_db_url: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    environ.update({"MF_DATABASE_URL": empty_db_url, "MF_LOG_FORMAT": "json"})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mf_worker", "migrate"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied_lines = [line for out, _ in outputs for line in out.splitlines()
                     if line.startswith("applied ")]
    # Each migration is applied exactly once, by whichever process took the lock first.
    assert sorted(applied_lines) == [f"applied {m.label}" for m in load_migrations()]
    with psycopg.connect(empty_db_url) as conn:
        count = conn.execute("SELECT count(*) FROM mf_schema_migrations").fetchone()
    assert count == (len(load_migrations()),)


def test_migrate_refuses_to_run_without_a_database_url() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    environ.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "mf_worker", "migrate"],
        capture_output=True, text=True, env=environ, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "MF_DATABASE_URL is not set" in result.stderr


def test_a_failing_migration_rolls_back_and_names_itself(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from mf_worker.db import connect
    from mf_worker.db import migrate as migrate_mod
    from mf_worker.errors import MigrationError

    from .conftest import settings_for

    good = load_migrations()
    broken = migrate_mod.Migration(9999, "broken", "CREATE TABLE half_done (x int); SELEC 1", "x")
    monkeypatch.setattr(migrate_mod, "load_migrations", lambda: [*good, broken])

    async def run() -> Any:
        conn = await connect(settings_for(empty_db_url))
        async with conn:
            return await migrate_mod.apply_migrations(conn)

    with pytest.raises(MigrationError, match="9999_broken failed and was rolled back"):
        asyncio.run(run())
    assert "half_done" not in tables(empty_db_url)
    assert "organizations" in tables(empty_db_url), "earlier migrations stay applied"


def test_migrations_and_roles_apply_as_a_non_superuser_database_owner(pg_admin_url: str) -> None:
    """As deploy/ and docs/operations.md run them: `mf-worker migrate` and database-roles.sql
    as an owner that is not a superuser (CREATEROLE, owns the database); the definer functions
    then belong to that ordinary role, and the worker role works under it."""
    import uuid

    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from .conftest import require_binary
    from .workers import ROOT, run_burst

    suffix = uuid.uuid4().hex[:10]
    owner, worker, dbname = f"mf_test_owner_{suffix}", f"mf_test_wk_{suffix}", f"mf_o_{suffix}"
    admin = psycopg.connect(pg_admin_url, autocommit=True)
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS CREATEROLE").format(
        sql.Identifier(owner)))
    admin.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
        sql.Identifier(dbname), sql.Identifier(owner)))
    params = conninfo_to_dict(pg_admin_url)
    as_owner = make_conninfo("", **{**params, "dbname": dbname, "user": owner})
    try:
        migrated = cli("migrate", url=as_owner)
        assert migrated.returncode == 0, migrated.stderr
        applied = subprocess.run(
            [require_binary("psql"), as_owner, "-v", f"worker_role={worker}",
             "-v", "worker_password='x'", "-f", str(ROOT / "docs" / "database-roles.sql")],
            capture_output=True, text=True, timeout=60, check=False)
        assert applied.returncode == 0, applied.stderr
        with psycopg.connect(as_owner, autocommit=True) as conn:
            owners = conn.execute(
                "SELECT DISTINCT r.rolname, r.rolsuper FROM pg_proc p"
                " JOIN pg_roles r ON r.oid = p.proowner WHERE p.prosecdef").fetchall()
            assert owners == [(owner, False)]
            conn.execute("INSERT INTO organizations (id, name) VALUES ('org_1', 'A')")
            conn.execute("INSERT INTO users (id, organization_id, email, timezone)"
                         " VALUES ('usr_1', 'org_1', 'a@example.com', 'UTC')")
            conn.execute("INSERT INTO projects (id, organization_id, user_id, title,"
                         " cadence_config) VALUES ('prj_1', 'org_1', 'usr_1', 'T',"
                         " '{\"mode\": \"daily\"}')")
            conn.execute("INSERT INTO episode_schedule_queue (id, project_id, organization_id,"
                         " scheduled_for) VALUES ('queue_1', 'prj_1', 'org_1', now())")
        as_worker = make_conninfo("", **{**params, "dbname": dbname, "user": worker})
        reports = run_burst(as_worker, generator="template")
        assert [r.outcome.value for r in reports] == ["success"]
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))
        for role in (worker, owner):
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.close()
