"""Fixtures: every test that needs one gets its own real, freshly migrated PostgreSQL database.

The schema is migrated once per test process into a template database; each test then gets a
``CREATE DATABASE … TEMPLATE`` copy (milliseconds), so tests run in parallel (pytest-xdist)
without seeing each other's rows, and a test may do anything to its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from mf_worker.db import connect
from mf_worker.db.migrate import apply_migrations
from mf_worker.settings import Settings, load_settings

from .pg import postgres_server, with_database

REQUIRE_ALL = os.environ.get("MF_TEST_REQUIRE_ALL") == "1"


def require_binary(name: str) -> str:
    """Path of an external tool a test needs; skip without it (fail in CI, which installs it)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a maintenance database on the test server (may create databases and roles)."""
    with postgres_server() as url:
        yield url


def settings_for(url: str, **overrides: Any) -> Settings:
    """Settings for a test: only the database URL from the test, defaults for the rest."""
    overrides = {"metrics_addr": "127.0.0.1:0", **overrides}
    settings, _ = load_settings(environ={}, overrides={"database_url": url, **overrides})
    return settings


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    name = f"mf_tpl_{uuid.uuid4().hex[:12]}"
    with _admin(pg_admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_admin_url, name)

    async def migrate() -> None:
        conn = await connect(settings_for(url))
        async with conn:
            await apply_migrations(conn)

    asyncio.run(migrate())
    yield name
    with _admin(pg_admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fresh_database(pg_admin_url: str, template: str) -> Iterator[str]:
    name = f"mf_t_{uuid.uuid4().hex[:16]}"
    with _admin(pg_admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield with_database(pg_admin_url, name)
    finally:
        with _admin(pg_admin_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """URL of a freshly migrated database of this test's own."""
    yield from _fresh_database(pg_admin_url, template_db)


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """URL of an empty database (no migrations applied)."""
    yield from _fresh_database(pg_admin_url, "template0")


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit connection (as the owner, so RLS does not apply) to the test's database."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def settings(db_url: str) -> Settings:
    return settings_for(db_url)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Route mf-worker's logs (JSON lines) into a buffer for the test; restore afterwards."""
    from mf_worker.logs import configure_logging

    buffer = io.StringIO()
    configure_logging("json", "debug", stream=buffer)
    yield buffer
    # The process's own stderr: pytest's sys.stderr at this point is this test's capture file,
    # which pytest closes, and a later test's log line would then raise "I/O operation on
    # closed file".
    configure_logging("json", "warning", stream=sys.__stderr__)


ROLES_SQL = Path(__file__).resolve().parent.parent / "docs" / "database-roles.sql"


def ensure_cross_org_role(conn: psycopg.Connection[Any]) -> None:
    """The operator-created capability role (cluster-wide); tolerate a concurrent creator."""
    with contextlib.suppress(errors.UniqueViolation):
        conn.execute(
            "DO $$ BEGIN CREATE ROLE mf_cross_org NOLOGIN;"
            " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )


@pytest.fixture
def worker_role_url(db_url: str, db: psycopg.Connection[dict[str, Any]]) -> Iterator[str]:
    """``db_url`` logged in as the documented least-privilege worker role: a fresh role made by
    applying docs/database-roles.sql with psql, as an operator does (no superuser, no
    BYPASSRLS, not the tables' owner, member of mf_cross_org). Row-level security applies to
    everything the worker does through it, unlike the superuser the other tests connect as."""
    role = f"mf_test_worker_{uuid.uuid4().hex[:10]}"
    psql = require_binary("psql")
    # Roles are cluster-wide: tests on other xdist workers may be creating it right now,
    # which the script's "create if missing" would race.
    ensure_cross_org_role(db)
    applied = subprocess.run(
        [psql, db_url, "-v", f"worker_role={role}", "-v", "worker_password='x'",
         "-f", str(ROLES_SQL)],
        capture_output=True, text=True, timeout=60, check=False)
    assert applied.returncode == 0, applied.stderr
    try:
        yield make_conninfo("", **{**conninfo_to_dict(db_url), "user": role})
    finally:
        # Whatever still runs as the role (a killed test's worker) must not keep it alive.
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                   [role])
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
