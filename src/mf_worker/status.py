"""``mf-worker status``, ``retry`` and ``cancel``: what an operator reads and does by hand.

The snapshot is read from the database, so any replica (or a laptop with the URL) reports the
same truth: counts by status, the lag of the oldest due item, expired leases (a worker died and
the reaper has not run yet), failed and blocked items with their errors, and projects that have
no next item (usually an invalid cadence or zone), and the projects that meet the seed's
triggers for migrating their memories to ``agent_memory``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg

from . import queue
from .audit import record_operator_action
from .cost.budget import list_blocked_orgs
from .db import Connection, act_for
from .db.sql import load_queries
from .errors import MfWorkerError
from .memories import read_migration_triggers
from .observability.queue_depth import STATUSES, read_queue_depth

_Q = load_queries(__package__ or "mf_worker", "status.sql")

@dataclass
class Snapshot:
    counts: dict[str, int]
    due_items: int
    oldest_due_lag_seconds: float | None
    late_items: int = 0
    late: list[dict[str, Any]] = field(default_factory=list)
    expired_leases: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    blocked: list[dict[str, Any]] = field(default_factory=list)
    projects_without_item: int = 0
    blocked_orgs: list[dict[str, Any]] = field(default_factory=list)
    spend_today: list[dict[str, Any]] = field(default_factory=list)
    memory_migration: dict[str, Any] = field(default_factory=dict)
    deferred: list[dict[str, Any]] = field(default_factory=list)
    provider_limits: list[dict[str, Any]] = field(default_factory=list)
    fallback_episodes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def read_snapshot(conn: Connection, *, default_limit_gbp: Decimal, limit: int = 20,
                        now: datetime | None = None) -> Snapshot:
    now = now or datetime.now(UTC)
    depth = await read_queue_depth(conn, now=now)

    async def rows(query: str, **params: Any) -> list[dict[str, Any]]:
        cur = await conn.execute(_Q[query], {"limit": limit, **params})
        return [_plain(r) for r in await cur.fetchall()]

    without = await (await conn.execute(_Q["count_active_projects_without_item"])).fetchone()
    return Snapshot(
        counts=depth["counts"],
        due_items=depth["due_items"],
        oldest_due_lag_seconds=depth["oldest_due_age_seconds"],
        late_items=depth["late_items"],
        late=await rows("list_late_items"),
        expired_leases=await rows("list_expired_leases"),
        failed=await rows("list_items_in_status", status="failed"),
        blocked=await rows("list_items_in_status", status="blocked"),
        projects_without_item=without["projects"] if without else 0,
        blocked_orgs=[_plain(r) for r in await list_blocked_orgs(
            conn, day=now.astimezone(UTC).date(), default_limit=default_limit_gbp)],
        spend_today=await rows("list_spend_today", date=now.astimezone(UTC).date(),
                               default_limit=default_limit_gbp),
        memory_migration=await read_migration_triggers(conn, now=now, limit=limit),
        deferred=await rows("count_deferred_items"),
        provider_limits=[_plain(k) for k in depth["limits"]],
        fallback_episodes=await rows("count_fallback_episodes"),
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values: instants and dates as ISO 8601, money as exact decimal strings."""
    return {k: v.isoformat() if isinstance(v, datetime | date)
            else str(v) if isinstance(v, Decimal) else v for k, v in row.items()}


def render_snapshot(snapshot: Snapshot) -> str:
    """The human-readable form of :func:`read_snapshot`."""
    lines = ["queue items by status:"]
    lines += [f"  {status:11} {snapshot.counts[status]:>8}" for status in STATUSES]
    lag = snapshot.oldest_due_lag_seconds
    lines.append(f"due now: {snapshot.due_items} (oldest waiting "
                 f"{'-' if lag is None else f'{lag:.1f} s'})")
    lines.append(f"late (delivery instant passed, episode not visible): {snapshot.late_items}")
    lines += [f"  {i['id']}  project {i['project_id']}  org {i['organization_id']}  "
              f"{i['status']}  due {i['scheduled_for']}  late {_duration(i['late_seconds'])}"
              + (f"  {i['last_error']}" if i.get("last_error") else "")
              for i in snapshot.late]
    lines.append(f"active projects without a next item: {snapshot.projects_without_item}"
                 + ("  (run `mf-worker schedule` to see why)"
                    if snapshot.projects_without_item else ""))
    if snapshot.blocked_orgs:
        lines.append("organisations over their daily cost limit:")
        lines += [f"  {o['organization_id']}  spent £{Decimal(o['spent_gbp']):.2f} of "
                  f"£{Decimal(o['limit_gbp']):.2f} today  ({o['items']} items blocked since "
                  f"{o['blocked_on']})"
                  + (f"  £{Decimal(o['estimated_gbp']):.2f} of it estimated"
                     if Decimal(o["estimated_gbp"]) else "")
                  for o in snapshot.blocked_orgs]
    if snapshot.spend_today:
        lines.append("spend today (UTC), largest first: measured + estimated (reserved "
                     "worst cases of calls whose usage is unknown), reserved in flight, limit:")
        lines += [f"  {o['organization_id']}  £{Decimal(o['measured_gbp']):.2f} measured + "
                  f"£{Decimal(o['estimated_gbp']):.2f} estimated, "
                  f"£{Decimal(o['reserved_gbp']):.2f} reserved, limit "
                  f"£{Decimal(o['limit_gbp']):.2f}" for o in snapshot.spend_today]
    memory = snapshot.memory_migration
    if memory.get("projects"):
        lines.append(f"projects with {memory['min_memories']}+ memories in projects.memories, "
                     "not (fully) migrated (run `mf-worker memories migrate`):")
        lines += [f"  {p['project_id']}  org {p['organization_id']}  {p['memories']} memories"
                  for p in memory["projects"]]
    if memory.get("three_months_since_launch") and memory.get("unmigrated_projects"):
        lines.append(f"launched on {memory['launched_on']}, over three months ago, and "
                     f"{memory['unmigrated_projects']} projects keep memories only in "
                     "projects.memories: run `mf-worker memories migrate --min-count 1`")
    if snapshot.deferred:
        lines.append("items waiting on the provider or a backoff (no attempt used):")
        lines += [f"  {d['deferred_reason']:15} {d['items']:>6}  next runs at "
                  f"{d['next_run_after']}" for d in snapshot.deferred]
    cooling = [k for k in snapshot.provider_limits if k["cooldown_until"]]
    if cooling:
        lines.append("provider limit keys holding their calls (fleet-wide):")
        lines += [f"  {k['limit_key']}  {k['cooldown_reason']} until {k['cooldown_until']}"
                  + ("  (the provider's quota is exhausted: top up the account)"
                     if k["cooldown_reason"] == "quota_exhausted" else "")
                  for k in cooling]
    if snapshot.fallback_episodes:
        lines.append("episodes written by the fallback generator in the last hour (the "
                     "primary could not serve them in time):")
        lines += [f"  {f['generator']}  {f['model']}  {f['episodes']:>6}  last at "
                  f"{f['last_at']}" for f in snapshot.fallback_episodes]
    sections = (("expired leases (worker lost; the reaper will return them)",
                 snapshot.expired_leases, "locked_by"),
                ("failed items", snapshot.failed, "last_error"),
                ("blocked items", snapshot.blocked, "last_error"))
    for title, items, detail in sections:
        if items:
            lines.append(f"{title}:")
            lines += [f"  {i['id']}  project {i['project_id']}  org {i['organization_id']}  "
                      f"attempts {i['attempt_count']}  {i.get(detail) or ''}" for i in items]
    return "\n".join(lines)


async def retry_queue_item(conn: Connection, item_id: str, *, actor: str) -> None:
    """Make a failed/cancelled/blocked item pending and due now, with a fresh start (attempts,
    retry deadline, backoff, deferrals and lost-worker count); its episode, if it failed with
    the item, is generating again. Audited under ``actor``."""
    try:
        async with conn.transaction():
            cur = await conn.execute(_Q["retry_item_now"], {"id": item_id})
            row = await cur.fetchone()
            if row is not None:
                await _update_episode(conn, row, "reopen_retried_episode", {})
                await _audit(conn, row, actor=actor, action="queue_item.retry")
    except psycopg.errors.UniqueViolation:
        raise MfWorkerError(
            f"{item_id}: its project already has another open item; cancel that one first"
        ) from None
    if row is None:
        raise MfWorkerError(await _why_not(conn, item_id, "retried"))


async def cancel_queue_item(conn: Connection, item_id: str, reason: str, *, actor: str) -> None:
    """Cancel a pending, blocked or processing item (a running generation's write is fenced
    out by its claim token; the episode an attempt had started fails with the reason, by the
    queue's trigger). The scheduler plans the project's following occurrence on its next
    pass. Audited under ``actor``."""
    async with conn.transaction():
        row = await queue.cancel_item_by_operator(conn, item_id, reason=reason)
        if row is not None:
            await _audit(conn, row, actor=actor, action="queue_item.cancel")
    if row is None:
        raise MfWorkerError(await _why_not(conn, item_id, "cancelled"))


async def _update_episode(
    conn: Connection, item: dict[str, Any], query: str, params: dict[str, Any]
) -> None:
    """Follow an operator's change of a queue item on its episode, acting for the item's
    organisation (row-level security), inside the caller's transaction."""
    if item["episode_id"] is None:
        return
    await act_for(conn, item["organization_id"])
    await conn.execute(_Q[query], {"episode_id": item["episode_id"], **params})


async def _audit(conn: Connection, row: dict[str, Any], *, actor: str, action: str) -> None:
    await record_operator_action(
        conn, actor=actor, organization_id=row["organization_id"], action=action,
        item_id=row["id"], old_status=row["old_status"], new_status=row["status"],
    )


async def _why_not(conn: Connection, item_id: str, verb: str) -> str:
    row = await queue.get_item(conn, item_id)
    if row is None:
        return f"no queue item {item_id!r}"
    return f"{item_id} is {row['status']} and cannot be {verb}"
