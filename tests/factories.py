"""Row factories: real rows in the test's database with sensible defaults, overridable per test."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from mf_worker.ids import new_id

Conn = psycopg.Connection[Any]


def _insert(conn: Conn, table: str, row: dict[str, Any]) -> dict[str, Any]:
    cols = ", ".join(row)
    params = ", ".join(f"%({k})s" for k in row)
    cur = conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({params}) RETURNING *", row)
    result = cur.fetchone()
    assert result is not None
    return dict(result) if not isinstance(result, dict) else result


def make_org(conn: Conn, **kw: Any) -> dict[str, Any]:
    row = {"id": new_id("org"), "name": "Acme Research", **kw}
    return _insert(conn, "organizations", row)


def make_user(conn: Conn, org: dict[str, Any], **kw: Any) -> dict[str, Any]:
    uid = new_id("usr")
    row = {"id": uid, "organization_id": org["id"], "email": f"{uid}@example.com",
           "timezone": "Europe/London", **kw}
    return _insert(conn, "users", row)


def make_project(
    conn: Conn, user: dict[str, Any], *, cadence: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    row = {
        "id": new_id("prj"),
        "organization_id": user["organization_id"],
        "user_id": user["id"],
        "title": "The future of urban farming",
        "description": "Vertical farms, policy and the economics of local food.",
        "cadence_config": Jsonb(cadence or {"mode": "daily", "days": []}),
        "delivery_time": time(9, 0),
        **kw,
    }
    return _insert(conn, "projects", row)


def make_queue_item(conn: Conn, project: dict[str, Any], **kw: Any) -> dict[str, Any]:
    row = {
        "id": new_id("queue"),
        "project_id": project["id"],
        "organization_id": project["organization_id"],
        "scheduled_for": datetime.now(UTC),
        **kw,
    }
    return _insert(conn, "episode_schedule_queue", row)


def make_episode(conn: Conn, project: dict[str, Any], **kw: Any) -> dict[str, Any]:
    row = {
        "id": new_id("ep"),
        "project_id": project["id"],
        "organization_id": project["organization_id"],
        "sequence_number": 1,
        **kw,
    }
    return _insert(conn, "episodes", row)


def make_note(conn: Conn, project: dict[str, Any], **kw: Any) -> dict[str, Any]:
    row = {
        "id": new_id("note"),
        "project_id": project["id"],
        "organization_id": project["organization_id"],
        "user_id": project["user_id"],
        "note": "More on regulation please",
        **kw,
    }
    return _insert(conn, "planning_notes", row)


def make_tenant(conn: Conn, **project_kw: Any) -> dict[str, dict[str, Any]]:
    """An organisation with one user and one project."""
    org = make_org(conn)
    user = make_user(conn, org)
    return {"org": org, "user": user, "project": make_project(conn, user, **project_kw)}


def one(conn: Conn, sql: str, *params: Any) -> dict[str, Any]:
    """The one row ``sql`` returns (a test that expects a row fails here, naming the query)."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return dict(row) if not isinstance(row, dict) else row


def item_state(conn: Conn, item_id: str) -> dict[str, Any]:
    """A queue item's row as it is now."""
    return one(conn, "SELECT * FROM episode_schedule_queue WHERE id = %s", item_id)
