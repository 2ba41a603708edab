"""The documented least-privilege worker role (docs/database-roles.sql), applied for real."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .conftest import require_binary
from .workers import ROOT


@contextmanager
def documented_worker_role(db_url: str, db: psycopg.Connection[Any]) -> Iterator[str]:
    """Apply docs/database-roles.sql with psql for a fresh role; yield a conninfo that logs in
    as that role (no superuser, no BYPASSRLS, not the owner). The role is dropped afterwards."""
    role = f"mf_test_worker_{uuid.uuid4().hex[:10]}"
    psql = require_binary("psql")
    applied = subprocess.run(
        [psql, db_url, "-v", f"worker_role={role}", "-v", "worker_password='x'",
         "-f", str(ROOT / "docs" / "database-roles.sql")],
        capture_output=True, text=True, timeout=60, check=False)
    assert applied.returncode == 0, applied.stderr
    try:
        yield make_conninfo("", **{**conninfo_to_dict(db_url), "user": role})
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
