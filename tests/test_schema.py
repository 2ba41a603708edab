"""The schema says what is valid: CHECK constraints, the one-open-item index, composite keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from .factories import (
    make_episode,
    make_note,
    make_org,
    make_project,
    make_queue_item,
    make_tenant,
    make_user,
)

Conn = psycopg.Connection[dict[str, Any]]
NOW = datetime.now(UTC)


def _block(conn: Conn, t: dict[str, Any], **kw: Any) -> None:
    ep = make_episode(conn, t["project"])
    conn.execute(
        "INSERT INTO blocks (episode_id, organization_id, content, position, type, confidence)"
        " VALUES (%(e)s, %(o)s, 'x', %(position)s, %(type)s, %(confidence)s)",
        {"e": ep["id"], "o": ep["organization_id"],
         **{"position": 0, "type": "MARKDOWN", "confidence": 0.5, **kw}},
    )


def _usage(conn: Conn, t: dict[str, Any], **kw: Any) -> None:
    row = {"operation": "chat", "model": "m", "prompt_tokens": 1, "completion_tokens": 1,
           "cost_gbp": 0, **kw}
    conn.execute(
        "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
        " completion_tokens, cost_gbp) VALUES (%(o)s, %(operation)s, %(model)s,"
        " %(prompt_tokens)s, %(completion_tokens)s, %(cost_gbp)s)",
        {"o": t["org"]["id"], **row},
    )


def _memory(conn: Conn, t: dict[str, Any], **kw: Any) -> None:
    row = {"content": "likes charts", "memory_type": "preference", "importance": 0.5, **kw}
    conn.execute(
        "INSERT INTO agent_memory (project_id, organization_id, content, memory_type, importance)"
        " VALUES (%(p)s, %(o)s, %(content)s, %(memory_type)s, %(importance)s)",
        {"p": t["project"]["id"], "o": t["org"]["id"], **row},
    )


def _memory_migration(conn: Conn, t: dict[str, Any], **kw: Any) -> None:
    row = {"entries": 0, "copied": 0, "skipped": 0, **kw}
    conn.execute(
        "INSERT INTO memory_migrations (project_id, organization_id, entries, copied, skipped)"
        " VALUES (%(p)s, %(o)s, %(entries)s, %(copied)s, %(skipped)s)",
        {"p": t["project"]["id"], "o": t["org"]["id"], **row},
    )


def _daily_column(conn: Conn, t: dict[str, Any], column: str, value: Any) -> None:
    conn.execute(
        f"INSERT INTO token_usage_daily (organization_id, date, {column})"
        " VALUES (%s, current_date, %s)", [t["org"]["id"], value],
    )


def _daily(conn: Conn, t: dict[str, Any], **kw: Any) -> None:
    row = {"total_tokens": 0, "total_cost_gbp": 0, "episode_count": 0, **kw}
    conn.execute(
        "INSERT INTO token_usage_daily (organization_id, date, total_tokens, total_cost_gbp,"
        " episode_count) VALUES (%(o)s, current_date, %(total_tokens)s, %(total_cost_gbp)s,"
        " %(episode_count)s)",
        {"o": t["org"]["id"], **row},
    )


def _chat(conn: Conn, t: dict[str, Any], role: str = "user") -> None:
    sid = conn.execute(
        "INSERT INTO chat_sessions (project_id, organization_id, user_id) VALUES (%s, %s, %s)"
        " RETURNING id", [t["project"]["id"], t["org"]["id"], t["user"]["id"]],
    ).fetchone()["id"]  # type: ignore[index]
    conn.execute(
        "INSERT INTO chat_messages (session_id, organization_id, role, content)"
        " VALUES (%s, %s, %s, 'hi')", [sid, t["org"]["id"], role],
    )


def _highlight(conn: Conn, t: dict[str, Any], start: int, end: int) -> None:
    ep = make_episode(conn, t["project"])
    bid = conn.execute(
        "INSERT INTO blocks (episode_id, organization_id, content, position)"
        " VALUES (%s, %s, 'text', 0) RETURNING id", [ep["id"], ep["organization_id"]],
    ).fetchone()["id"]  # type: ignore[index]
    conn.execute(
        "INSERT INTO highlights (block_id, organization_id, user_id, start_offset, end_offset,"
        " quote) VALUES (%s, %s, %s, %s, %s, 'q')",
        [bid, t["org"]["id"], t["user"]["id"], start, end],
    )


def _limit(conn: Conn, **values: Any) -> None:
    row = {"limit_key": "openai:x#m", "refilled_at": NOW, **values}
    conn.execute(
        f"INSERT INTO provider_limits ({', '.join(row)})"
        f" VALUES ({', '.join(f'%({k})s' for k in row)})", row)


# Each case writes one bad value; together they must hit every CHECK constraint in the schema.
BAD_VALUES: dict[str, Any] = {
    "org name blank": lambda c, t: make_org(c, name="  "),
    "org negative cost limit": lambda c, t: make_org(c, daily_cost_limit_gbp=-1),
    "user email without @": lambda c, t: make_user(c, t["org"], email="nobody"),
    "user empty timezone": lambda c, t: make_user(c, t["org"], timezone=""),
    "project blank title": lambda c, t: make_project(c, t["user"], title=" "),
    "project unknown status": lambda c, t: make_project(c, t["user"], status="deleted"),
    "project cadence not an object": lambda c, t: c.execute(
        "UPDATE projects SET cadence_config = '[1]'"),
    "project memories not an array": lambda c, t: c.execute(
        "UPDATE projects SET memories = '{}'"),
    "episode sequence 0": lambda c, t: make_episode(c, t["project"], sequence_number=0),
    "episode unknown status": lambda c, t: make_episode(c, t["project"], status="done"),
    "episode negative attempts": lambda c, t: make_episode(
        c, t["project"], generation_attempts=-1),
    "episode ready without title": lambda c, t: make_episode(c, t["project"], status="ready"),
    "episode withdrawn without reason": lambda c, t: make_episode(
        c, t["project"], status="withdrawn", title="t"),
    "queue unknown delivery": lambda c, t: make_queue_item(
        c, t["project"], status="completed", completed_at=NOW, delivery="sent"),
    "queue delivery before completion": lambda c, t: make_queue_item(
        c, t["project"], delivery="scheduled"),
    "block unknown type": lambda c, t: _block(c, t, type="HTML"),
    "block negative position": lambda c, t: _block(c, t, position=-1),
    "block confidence 7": lambda c, t: _block(c, t, confidence=7.0),
    "block confidence NaN": lambda c, t: _block(c, t, confidence=float("nan")),
    "queue unknown status": lambda c, t: make_queue_item(c, t["project"], status="running"),
    "queue negative attempts": lambda c, t: make_queue_item(c, t["project"], attempt_count=-1),
    "queue processing without lease": lambda c, t: make_queue_item(
        c, t["project"], status="processing", claim_token=1),
    "queue processing without claim token": lambda c, t: make_queue_item(
        c, t["project"], status="processing", locked_by="w",
        lease_expires_at=datetime.now(UTC)),
    "queue completed without time": lambda c, t: make_queue_item(
        c, t["project"], status="completed"),
    "queue metadata not an object": lambda c, t: make_queue_item(
        c, t["project"], metadata=Jsonb([1])),
    "usage unknown operation": lambda c, t: _usage(c, t, operation="embedding"),
    "usage empty model": lambda c, t: _usage(c, t, model=""),
    "usage negative prompt tokens": lambda c, t: _usage(c, t, prompt_tokens=-1),
    "usage negative completion tokens": lambda c, t: _usage(c, t, completion_tokens=-1),
    "usage negative cost": lambda c, t: _usage(c, t, cost_gbp=-0.01),
    "daily negative tokens": lambda c, t: _daily(c, t, total_tokens=-1),
    "daily negative cost": lambda c, t: _daily(c, t, total_cost_gbp=-1),
    "daily negative episodes": lambda c, t: _daily(c, t, episode_count=-1),
    "daily negative reservation": lambda c, t: c.execute(
        "INSERT INTO token_usage_daily (organization_id, date, reserved_gbp)"
        " VALUES (%s, current_date, -1)", [t["org"]["id"]]),
    "daily hourly tokens not 24 hours": lambda c, t: _daily_column(c, t, "hourly_tokens",
                                                                   [0] * 23),
    "daily negative hourly peak": lambda c, t: _daily_column(c, t, "hourly_peak", -1),
    "daily peak hour 24": lambda c, t: _daily_column(c, t, "peak_hour", 24),
    "daily negative estimated cost": lambda c, t: _daily_column(c, t, "estimated_cost_gbp",
                                                                -1),
    "trip negative needed": lambda c, t: c.execute(
        "INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp,"
        " needed_gbp) VALUES (%s, current_date, 1, 1, -1)", [t["org"]["id"]]),
    "trip negative notify attempts": lambda c, t: c.execute(
        "INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp,"
        " notify_attempts) VALUES (%s, current_date, 1, 1, -1)", [t["org"]["id"]]),
    "audit blank actor": lambda c, t: c.execute(
        "INSERT INTO audit_log (organization_id, action, actor) VALUES (%s, 'x', ' ')",
        [t["org"]["id"]]),
    "memory migration negative entries": lambda c, t: _memory_migration(c, t, entries=-1),
    "memory migration negative copied": lambda c, t: _memory_migration(c, t, copied=-1),
    "memory migration negative skipped": lambda c, t: _memory_migration(c, t, skipped=-1),
    "memory empty source": lambda c, t: c.execute(
        "INSERT INTO agent_memory (project_id, organization_id, content, source)"
        " VALUES (%s, %s, 'x', '')", [t["project"]["id"], t["org"]["id"]]),
    "queue negative reservation": lambda c, t: make_queue_item(
        c, t["project"], reserved_cost_gbp=-1, reserved_on=NOW.date()),
    "queue reservation without day": lambda c, t: make_queue_item(
        c, t["project"], reserved_cost_gbp=1),
    "note blank": lambda c, t: make_note(c, t["project"], note=" "),
    "second scheduler state row": lambda c, t: c.execute(
        "INSERT INTO scheduler_state (singleton) VALUES (false)"),
    "note unknown status": lambda c, t: make_note(c, t["project"], status="done"),
    "note incorporated without time": lambda c, t: make_note(
        c, t["project"], status="incorporated"),
    "memory blank": lambda c, t: _memory(c, t, content=""),
    "memory empty type": lambda c, t: _memory(c, t, memory_type=""),
    "memory importance 2": lambda c, t: _memory(c, t, importance=2),
    "event empty type": lambda c, t: c.execute(
        "INSERT INTO user_events (organization_id, event_type) VALUES (%s, '')",
        [t["org"]["id"]]),
    "audit empty action": lambda c, t: c.execute(
        "INSERT INTO audit_log (organization_id, action) VALUES (%s, '')", [t["org"]["id"]]),
    "chat unknown role": lambda c, t: _chat(c, t, role="robot"),
    "highlight negative start": lambda c, t: _highlight(c, t, -1, 3),
    "highlight end before start": lambda c, t: _highlight(c, t, 5, 5),
    "queue negative retries": lambda c, t: make_queue_item(c, t["project"], retry_count=-1),
    "queue negative deferrals": lambda c, t: make_queue_item(
        c, t["project"], deferred_count=-1),
    "queue negative losses": lambda c, t: make_queue_item(c, t["project"], lost_count=-1),
    "queue unknown deferral": lambda c, t: make_queue_item(
        c, t["project"], deferred_reason="bored"),
    "limit empty key": lambda c, t: _limit(c, limit_key=""),
    "limit zero request rate": lambda c, t: _limit(c, requests_per_second=0),
    "limit zero token rate": lambda c, t: _limit(c, tokens_per_second=0),
    "limit zero configured request rate": lambda c, t: _limit(
        c, configured_requests_per_second=0),
    "limit zero configured token rate": lambda c, t: _limit(c, configured_tokens_per_second=0),
    "limit zero learned request rate": lambda c, t: _limit(c, learned_requests_per_second=0),
    "limit zero learned token rate": lambda c, t: _limit(c, learned_tokens_per_second=0),
    "limit unknown cooldown": lambda c, t: _limit(c, cooldown_until=NOW, cooldown_reason="bored"),
    "limit negative 429s": lambda c, t: _limit(c, rate_limited_count=-1),
    "limit negative pauses": lambda c, t: _limit(c, quota_pauses=-1),
    "limit cooldown without reason": lambda c, t: _limit(c, cooldown_until=NOW),
}


def test_every_check_constraint_rejects_a_bad_value(db: Conn) -> None:
    """Each bad value is rejected, and the cases cover every CHECK constraint in the schema."""
    hit: set[str] = set()
    for label, write in BAD_VALUES.items():
        tenant = make_tenant(db)
        with pytest.raises(errors.CheckViolation) as info, db.transaction():
            write(db, tenant)
        assert info.value.diag.constraint_name, label
        hit.add(f"{info.value.diag.table_name}.{info.value.diag.constraint_name}")
    declared = {
        f"{r['table']}.{r['name']}"
        for r in db.execute(
            "SELECT conrelid::regclass::text AS table, conname AS name FROM pg_constraint"
            " WHERE contype = 'c' AND connamespace = 'public'::regnamespace"
        ).fetchall()
    }
    assert declared - hit == set(), "CHECK constraints no test case exercises"


def test_second_open_item_for_a_project_is_rejected(db: Conn) -> None:
    tenant = make_tenant(db)
    make_queue_item(db, tenant["project"])
    with pytest.raises(errors.UniqueViolation, match="one_open_per_project"):
        make_queue_item(db, tenant["project"], scheduled_for=NOW + timedelta(days=1))
    # blocked and processing count as open too; completed/failed/cancelled do not.
    db.execute("UPDATE episode_schedule_queue SET status = 'blocked'")
    with pytest.raises(errors.UniqueViolation):
        make_queue_item(db, tenant["project"])
    db.execute("UPDATE episode_schedule_queue SET status = 'cancelled'")
    make_queue_item(db, tenant["project"])
    assert db.execute("SELECT count(*) AS n FROM episode_schedule_queue").fetchone() == {"n": 2}


def test_run_after_defaults_to_scheduled_for(db: Conn) -> None:
    tenant = make_tenant(db)
    when = NOW + timedelta(hours=3)
    item = make_queue_item(db, tenant["project"], scheduled_for=when)
    assert item["run_after"] == item["scheduled_for"]


def test_a_child_row_cannot_point_at_another_organisations_parent(db: Conn) -> None:
    a, b = make_tenant(db), make_tenant(db)
    with pytest.raises(errors.ForeignKeyViolation):
        make_queue_item(db, a["project"], organization_id=b["org"]["id"])
    with pytest.raises(errors.ForeignKeyViolation):
        make_episode(db, a["project"], organization_id=b["org"]["id"])


def test_ids_may_be_any_text_and_default_to_prefixed_ids(db: Conn) -> None:
    org = make_org(db, id="legacy-org-42")
    assert org["id"] == "legacy-org-42"
    row = db.execute("INSERT INTO organizations (name) VALUES ('x') RETURNING id").fetchone()
    assert row is not None and row["id"].startswith("org_")


def test_deleting_a_project_keeps_its_usage_and_detaches_its_queue_item(db: Conn) -> None:
    tenant = make_tenant(db)
    item = make_queue_item(db, tenant["project"])
    _usage(db, tenant)
    db.execute(
        "UPDATE token_usage SET project_id = %s", [tenant["project"]["id"]]
    )
    db.execute("DELETE FROM projects WHERE id = %s", [tenant["project"]["id"]])
    row = db.execute(
        "SELECT project_id, organization_id, status FROM episode_schedule_queue WHERE id = %s",
        [item["id"]],
    ).fetchone()
    assert row == {"project_id": None, "organization_id": tenant["org"]["id"],
                   "status": "pending"}
    usage = db.execute("SELECT project_id, organization_id FROM token_usage").fetchone()
    assert usage == {"project_id": None, "organization_id": tenant["org"]["id"]}


def test_a_pending_item_notifies_the_queue_channel(db_url: str, db: Conn) -> None:
    tenant = make_tenant(db)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN mf_worker_queue")
        make_queue_item(db, tenant["project"])
        got = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in got] == ["mf_worker_queue"]
