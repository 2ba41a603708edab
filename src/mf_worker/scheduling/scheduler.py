"""The scheduler's planning: every active project always has exactly one correct open queue
item. The loop that runs a pass every interval is ``maintenance.scheduler``; ``run_pass`` here
is one pass, and ``enqueue_item`` the operator's extra item.

A pass cancels items of paused, archived and deleted projects, re-plans waiting items whose
project changed its cadence, delivery time or zone, and plans the next item of every active
project that has none. An item is due at its delivery instant (``scheduled_for``) but
claimable a lead window before it (``run_after = scheduled_for - lead``, ``MF_LEAD_SECONDS``).
A slot is generated once: a slot whose item completed (its episode perhaps waiting to be
published) or failed, or that an operator cancelled (``mf-worker cancel``: that delivery is
skipped), is never planned again; only an operator's ``retry`` or ``enqueue`` opens it again.
An item the system cancelled (its project paused, ``enqueue --replace``) ends nothing.

A pass's cost follows what changed, not how many projects there are:

* One pass per fleet. A pass holds a PostgreSQL advisory lock (``SCHEDULER_LOCK_KEY``) from
  start to end, in a transaction that a second pooled connection keeps open (so it holds
  through a transaction-mode pooler too, and goes with a dead process); a replica that cannot
  take it skips. The daemon's loop also skips when any replica ran a pass within the
  interval (``scheduler_state``, on the database's clock), so a fleet of any size plans once
  per ``MF_SCHEDULER_INTERVAL``.
* A steady pass reads the change log (``scheduler_project_changes``, kept by the triggers of
  migration 0009: new projects; changes of status, cadence, delivery time or owner; an owner's
  zone; an open item that ended without a next one) and handles only those projects, each batch
  in the transaction that deletes its log rows.
* A full sweep (the old pass: every project) runs every ``MF_SCHEDULER_SWEEP_INTERVAL`` as a
  safety net, and whenever ``mf-worker schedule`` is run by hand.

The unique index on open items per project still decides any race (an ``enqueue`` by hand, the
final write planning the next item), and losing it is not an error. A project whose cadence or
zone is invalid gets no item; it is reported once per process and counted.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

from psycopg.types.json import Jsonb

from ..audit import record_operator_action
from ..db import Connection, Pool
from ..db.sql import load_queries
from ..errors import ConfigError, MfWorkerError
from ..ids import new_id
from .cadence import CadenceError, next_occurrence, zone_for

_Q = load_queries(__package__ or "mf_worker.scheduling", "queries.sql")

BATCH_SIZE = 1000
# The fleet's scheduler lock (pg_try_advisory_lock): any constant unlikely to collide with
# other software's advisory locks; "mfsched" in ASCII.
SCHEDULER_LOCK_KEY = 0x6D66_7363_6865_64


@dataclass(frozen=True, slots=True)
class PlannedItem:
    """When a project's next episode is due, and the metadata that explains it."""

    scheduled_for: datetime
    metadata: dict[str, Any]


def plan_next_item(
    cadence_config: Any, delivery_time: time, timezone: str, after: datetime,
    ended: Collection[datetime] = (),
) -> PlannedItem:
    """The next occurrence strictly after ``after`` that is not one of the ``ended`` slots
    (instants whose item already reached a final state: a slot is generated once), with the
    debugging metadata the item keeps.

    Raises :class:`CadenceError` naming the bad field.
    """
    when = next_occurrence(cadence_config, delivery_time, timezone, after)
    skip = set(ended)
    while when in skip:  # each ended slot moves the plan on once: at most len(ended) times
        skip.discard(when)
        when = next_occurrence(cadence_config, delivery_time, timezone, when)
    local = when.astimezone(zone_for(timezone))
    return PlannedItem(
        scheduled_for=when,
        metadata={
            "user_timezone": timezone,
            "user_local_time": local.isoformat(),
            "cadence": cadence_config,
            "delivery_time": delivery_time.isoformat(),
        },
    )


class ProjectNotSchedulable(MfWorkerError):
    """``enqueue`` cannot add an item for this project (the message says why)."""


class InstantOutOfRange(ConfigError):
    """A delivery instant given by hand is before 2000 or more than a year ahead."""


# The instants an operator may give (`enqueue --at`): a date before 2000 is a typo (year 1
# overflows every zone's arithmetic, and a claim of it would fail), and more than a year ahead
# is nothing a daily, weekly or custom cadence plans.
EARLIEST_INSTANT = datetime(2000, 1, 1, tzinfo=UTC)
MAX_AHEAD = timedelta(days=366)


def check_instant(when: datetime, now: datetime, *, name: str = "instant") -> datetime:
    """``when`` in UTC if it has a zone and lies between 2000-01-01 and a year after ``now``;
    else :class:`InstantOutOfRange` naming ``name`` (comparisons of aware instants never
    overflow, unlike converting year 1 to UTC)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise InstantOutOfRange(f"{name}: give an offset or Z (e.g. 2026-01-05T09:00:00Z)")
    latest = now + MAX_AHEAD
    if when < EARLIEST_INSTANT:
        raise InstantOutOfRange(f"{name}: {when.isoformat()} is before 2000-01-01")
    if when > latest:
        raise InstantOutOfRange(
            f"{name}: {when.isoformat()} is more than a year ahead (after "
            f"{latest.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})")
    return when.astimezone(UTC)


@dataclass
class SchedulerResult:
    """What one pass did."""

    created: int = 0
    rescheduled: int = 0
    cancelled: int = 0
    invalid: dict[str, str] = field(default_factory=dict)  # project id → error
    skipped: bool = False  # another replica holds the lock, or ran this interval's pass
    swept: bool = False  # this pass was a full sweep of every project
    examined: int = 0  # projects taken from the change log
    changed: set[str] = field(default_factory=set)  # their ids


@dataclass(frozen=True, slots=True)
class PassOptions:
    """How a pass plans: the knobs of :func:`run_pass` (the daemon's loop,
    ``maintenance.scheduler``, fills them from its config)."""

    # Seconds before its delivery instant an item becomes claimable (MF_LEAD_SECONDS).
    lead_seconds: float = 0.0
    # Seconds between full sweeps of every project (MF_SCHEDULER_SWEEP_INTERVAL).
    sweep_interval: float = 3600.0
    # Projects (or items) handled per statement and per change-log transaction.
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        if self.lead_seconds < 0:
            raise ValueError(
                f"scheduler: lead_seconds must not be negative, got {self.lead_seconds}")
        if not (self.sweep_interval > 0 and self.batch_size > 0):
            raise ValueError("scheduler: sweep_interval and batch_size must be positive")


async def run_pass(
    pool: Pool, now: datetime, options: PassOptions, *, min_gap_seconds: float | None = None,
    sweep: bool | None = None, wait: bool = False,
) -> SchedulerResult:
    """One pass at ``now``, unless another replica holds the fleet's lock (``skipped``; with
    ``wait``, after that replica's pass ends).

    ``min_gap_seconds``: also skip when any replica's pass started less than this long ago
    (on the database's clock). ``sweep``: True forces a full sweep, False forbids one; None
    sweeps when the last sweep is older than the sweep interval (or in the future of ``now``).
    ``result.changed`` names the projects taken from the change log.
    """
    result = SchedulerResult()
    async with pool.connection() as lock_conn, lock_conn.transaction():
        await lock_conn.execute(_Q["hold_fleet_lock_open"])
        cur = await lock_conn.execute(_Q["wait_for_fleet_lock" if wait else "try_fleet_lock"],
                                      {"key": SCHEDULER_LOCK_KEY})
        row = await cur.fetchone()
        if not (row and row["locked"]):
            result.skipped = True
            return result
        async with pool.connection() as conn:
            if min_gap_seconds is not None:
                cur = await conn.execute(_Q["claim_paced_pass"],
                                         {"min_gap_seconds": min_gap_seconds})
                if await cur.fetchone() is None:
                    result.skipped = True
                    return result
            if sweep is None:
                sweep = await _sweep_due(conn, now, options.sweep_interval)
            if sweep:
                await _sweep(conn, now, result, options)
            else:
                result.cancelled = await cancel_items_of_deleted_projects(conn)
            await _handle_changes(conn, now, result, options)
    return result


async def _sweep_due(conn: Connection, now: datetime, sweep_interval: float) -> bool:
    row = await (await conn.execute(_Q["get_last_sweep"])).fetchone()
    last = row["last_sweep_at"] if row else None
    return last is None or last > now or (now - last).total_seconds() >= sweep_interval


async def _sweep(conn: Connection, now: datetime, result: SchedulerResult,
                 options: PassOptions) -> None:
    """Every project, as every pass did before the change log: the safety net."""
    result.swept = True
    await conn.execute(_Q["clear_project_changes"])
    result.cancelled = await cancel_items_of_unschedulable_projects(conn)
    result.rescheduled = await _reschedule_stale(conn, now, result, options)
    result.created = await _plan_missing(conn, now, result, options)
    await conn.execute(_Q["stamp_sweep"], {"now": now})


async def _handle_changes(conn: Connection, now: datetime, result: SchedulerResult,
                          options: PassOptions) -> None:
    """Drain the change log in batches, each in the transaction that deletes its rows."""
    while True:
        async with conn.transaction():
            cur = await conn.execute(_Q["take_project_changes"],
                                     {"limit": options.batch_size})
            ids = [r["project_id"] for r in await cur.fetchall()]
            if not ids:
                return
            result.examined += len(ids)
            result.changed.update(ids)
            params = {"ids": ids}
            cur = await conn.execute(_Q["cancel_items_of_inactive_projects_in"], params)
            result.cancelled += len(await cur.fetchall())
            await conn.execute(_Q["clear_next_scheduled_at_of_inactive_projects_in"], params)
            cur = await conn.execute(_Q["list_stale_pending_items_in"], {**params, "now": now})
            stale = _plan_rows(await cur.fetchall(), now, result, key="project_id")
            if stale:
                result.rescheduled += await _reschedule(conn, stale, options.lead_seconds)
            cur = await conn.execute(_Q["list_projects_without_open_item_in"],
                                     {**params, "now": now})
            planned = _plan_rows(await cur.fetchall(), now, result)
            if planned:
                result.created += await _insert_planned(conn, planned, options.lead_seconds)


async def _plan_missing(conn: Connection, now: datetime, result: SchedulerResult,
                        options: PassOptions) -> int:
    created, after_id = 0, ""
    while True:
        cur = await conn.execute(
            _Q["list_projects_without_open_item"],
            {"after_id": after_id, "limit": options.batch_size, "now": now},
        )
        rows = await cur.fetchall()
        if not rows:
            return created
        after_id = rows[-1]["id"]
        planned = _plan_rows(rows, now, result)
        if planned:
            created += await _insert_planned(conn, planned, options.lead_seconds)


async def _reschedule_stale(conn: Connection, now: datetime, result: SchedulerResult,
                            options: PassOptions) -> int:
    moved, after_id = 0, ""
    while True:
        cur = await conn.execute(
            _Q["list_stale_pending_items"],
            {"after_id": after_id, "limit": options.batch_size, "now": now}
        )
        rows = await cur.fetchall()
        if not rows:
            return moved
        after_id = rows[-1]["id"]
        planned = _plan_rows(rows, now, result, key="project_id")
        if planned:
            moved += await _reschedule(conn, planned, options.lead_seconds)


def _plan_rows(
    rows: list[dict[str, Any]], now: datetime, result: SchedulerResult, key: str = "id"
) -> list[tuple[dict[str, Any], PlannedItem]]:
    planned = []
    for row in rows:
        try:
            # Slots ahead whose item already ended (completed, perhaps with its episode waiting
            # for the instant; failed; cancelled) are not planned again: the next after them.
            plan = plan_next_item(row["cadence_config"], row["delivery_time"], row["timezone"],
                                  now, row["ended_slots"])
        except CadenceError as exc:
            result.invalid[row[key]] = str(exc)
            continue
        planned.append((row, plan))
    return planned


async def _reschedule(
    conn: Connection, planned: list[tuple[dict[str, Any], PlannedItem]], lead_seconds: float
) -> int:
    async with conn.transaction():
        cur = await conn.execute(
            _Q["reschedule_items"],
            {
                "ids": [row["id"] for row, _ in planned],
                "scheduled_for": [p.scheduled_for for _, p in planned],
                "metadata": [Jsonb(p.metadata) for _, p in planned],
                "lead_seconds": lead_seconds,
            },
        )
        changed = await cur.fetchall()
        await _cache(conn, changed)
    return len(changed)


async def _insert_planned(
    conn: Connection, planned: list[tuple[dict[str, Any], PlannedItem]], lead_seconds: float
) -> int:
    async with conn.transaction():
        cur = await conn.execute(
            _Q["insert_planned_items"],
            {
                "ids": [new_id("queue") for _ in planned],
                "project_ids": [row["id"] for row, _ in planned],
                "organization_ids": [row["organization_id"] for row, _ in planned],
                "scheduled_for": [p.scheduled_for for _, p in planned],
                "metadata": [Jsonb(p.metadata) for _, p in planned],
                "lead_seconds": lead_seconds,
            },
        )
        inserted = await cur.fetchall()
        await _cache(conn, inserted)
    return len(inserted)


async def _cache(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(
            _Q["cache_next_scheduled_at"],
            {
                "project_ids": [r["project_id"] for r in rows],
                "scheduled_for": [r["scheduled_for"] for r in rows],
            },
        )


async def cancel_items_of_unschedulable_projects(conn: Connection) -> int:
    """Cancel waiting items of paused, archived or deleted projects; clear their cache."""
    async with conn.transaction():
        cur = await conn.execute(_Q["cancel_items_of_inactive_projects"])
        cancelled = len(await cur.fetchall())
        cur = await conn.execute(_Q["cancel_items_of_deleted_projects"])
        cancelled += len(await cur.fetchall())
        await conn.execute(_Q["clear_next_scheduled_at_of_inactive_projects"])
    return cancelled


async def cancel_items_of_deleted_projects(conn: Connection) -> int:
    """Cancel waiting items whose project was deleted (found through the open-item index, so
    every pass can afford it: a deletion leaves no project row to log)."""
    cur = await conn.execute(_Q["cancel_items_of_deleted_projects"])
    return len(await cur.fetchall())


async def _insert_item(
    conn: Connection, *, item_id: str, project_id: str, organization_id: str,
    plan: PlannedItem, lead_seconds: float,
) -> dict[str, Any] | None:
    cur = await conn.execute(
        _Q["insert_enqueued_item"],
        {
            "id": item_id,
            "project_id": project_id,
            "organization_id": organization_id,
            "scheduled_for": plan.scheduled_for,
            "metadata": Jsonb(plan.metadata),
            "lead_seconds": lead_seconds,
        },
    )
    return await cur.fetchone()


async def enqueue_item(
    conn: Connection, project_id: str, *, at: datetime | None, replace: bool, now: datetime,
    actor: str, lead_seconds: float = 0.0,
) -> tuple[str, datetime]:
    """Add an extra item for a project now (or at ``at``); for support and debugging.

    The item is due at ``at`` (published then) and claimable ``lead_seconds`` before it; an
    ``at`` before 2000 or more than a year after ``now`` raises :class:`InstantOutOfRange`.

    Refuses when the project already has an open item, unless ``replace`` cancels the waiting
    one (an item being processed is never replaced). Returns the new item's id and due time.
    The new item (and a replaced one) is audited under ``actor``.
    """
    if at is not None:
        at = check_instant(at, now, name="--at")
    async with conn.transaction():
        cur = await conn.execute(_Q["get_project_for_enqueue"], {"project_id": project_id})
        project = await cur.fetchone()
        if project is None:
            raise ProjectNotSchedulable(f"project {project_id!r} does not exist")
        if project["status"] != "active":
            raise ProjectNotSchedulable(
                f"project {project_id} is {project['status']}; only active projects get episodes"
            )
        replaced: dict[str, Any] | None = None
        new_item_id = new_id("queue")
        if project["open_item_id"] is not None:
            open_desc = (
                f"{project['open_item_id']} ({project['open_item_status']}, due "
                f"{project['open_item_due'].astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})"
            )
            if not replace:
                raise ProjectNotSchedulable(
                    f"project {project_id} already has an open item {open_desc}; "
                    "use --replace to cancel it and enqueue a new one"
                )
            cur = await conn.execute(
                _Q["cancel_open_pending_item"],
                {"id": project["open_item_id"], "reason": "replaced by mf-worker enqueue",
                 "replaced_by": new_item_id},
            )
            replaced = await cur.fetchone()
            if replaced is None:
                raise ProjectNotSchedulable(
                    f"project {project_id}'s open item {open_desc} is being processed and "
                    "cannot be replaced; try again when it has finished"
                )
        when = at or now
        try:
            local = when.astimezone(zone_for(project["timezone"])).isoformat()
        except CadenceError:
            local = when.astimezone(UTC).isoformat()
        plan = PlannedItem(
            scheduled_for=when,
            metadata={
                "manual": True,
                "user_timezone": project["timezone"],
                "user_local_time": local,
                "enqueued_at": now.isoformat(),
            },
        )
        row = await _insert_item(conn, item_id=new_item_id, project_id=project_id,
                                 organization_id=project["organization_id"], plan=plan,
                                 lead_seconds=lead_seconds)
        if row is None:  # a scheduler slipped one in between: the index decided
            raise ProjectNotSchedulable(f"project {project_id} got an open item concurrently")
        item_id: str = row["id"]
        await record_operator_action(
            conn, actor=actor, organization_id=project["organization_id"],
            action="queue_item.enqueue", item_id=item_id, old_status=None, new_status="pending",
        )
        if replaced is not None:
            await record_operator_action(
                conn, actor=actor, organization_id=project["organization_id"],
                action="queue_item.replace", item_id=project["open_item_id"],
                old_status=replaced["old_status"], new_status="cancelled",
            )
    return item_id, when
