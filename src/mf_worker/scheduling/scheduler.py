"""The scheduler: every active project always has exactly one correct open queue item.

One pass (``Scheduler.run_once``) cancels items of paused, archived and deleted projects,
re-plans waiting items whose project changed its cadence, delivery time or zone, and plans the
next item of every active project that has none. An item is due at its delivery instant
(``scheduled_for``) but claimable a lead window before it (``run_after = scheduled_for -
lead``, ``MF_LEAD_SECONDS``); a slot whose episode was already generated in that window and
waits to be published is never planned again. Many daemons may run it at once: the unique
index on open items per project decides, and losing that race is not an error. A project whose
cadence or zone is invalid gets no item; it is reported once per process and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import Any

from psycopg.types.json import Jsonb

from ..audit import record_operator_action
from ..db import Connection, Pool
from ..db.sql import load_queries
from ..engine.loops import PeriodicLoop
from ..errors import MfWorkerError
from ..ids import new_id
from .cadence import CadenceError, next_occurrence, zone_for

_Q = load_queries(__package__ or "mf_worker.scheduling", "queries.sql")

BATCH_SIZE = 1000


@dataclass(frozen=True, slots=True)
class PlannedItem:
    """When a project's next episode is due, and the metadata that explains it."""

    scheduled_for: datetime
    metadata: dict[str, Any]


def plan_next_item(
    cadence_config: Any, delivery_time: time, timezone: str, after: datetime
) -> PlannedItem:
    """The next occurrence strictly after ``after``, with the debugging metadata the item keeps.

    Raises :class:`CadenceError` naming the bad field.
    """
    when = next_occurrence(cadence_config, delivery_time, timezone, after)
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


@dataclass
class SchedulerResult:
    """What one pass did."""

    created: int = 0
    rescheduled: int = 0
    cancelled: int = 0
    invalid: dict[str, str] = field(default_factory=dict)  # project id → error


class Scheduler(PeriodicLoop):
    """The scheduler loop (runs inside ``mf-worker run``; ``mf-worker schedule`` runs one pass)."""

    name = "scheduler"

    def __init__(
        self,
        pool: Pool,
        interval: float,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_invalid: Callable[[str, str], None] | None = None,
        on_pass: Callable[[int, int], None] | None = None,
        batch_size: int = BATCH_SIZE,
        lead_seconds: float = 0.0,
    ) -> None:
        super().__init__(interval)
        if lead_seconds < 0:
            raise ValueError(f"scheduler: lead_seconds must not be negative, got {lead_seconds}")
        self._pool = pool
        self._lead_seconds = lead_seconds
        self._clock = clock
        self._batch_size = batch_size
        self._on_invalid = on_invalid
        self._on_pass = on_pass
        self._reported: dict[str, str] = {}

    async def run_once(self, now: datetime | None = None) -> SchedulerResult:
        now = now or self._clock()
        result = SchedulerResult()
        async with self._pool.connection() as conn:
            result.cancelled = await cancel_items_of_unschedulable_projects(conn)
            result.rescheduled = await self._reschedule_stale(conn, now, result)
            result.created = await self._plan_missing(conn, now, result)
        for project_id, error in result.invalid.items():
            if self._reported.get(project_id) != error:
                self._log.warning("project_schedule_invalid", project_id=project_id, error=error)
                self._reported[project_id] = error
            if self._on_invalid is not None:
                self._on_invalid(project_id, error)
        if self._on_pass is not None:
            self._on_pass(result.created, len(result.invalid))
        if result.created or result.rescheduled or result.cancelled:
            self._log.info(
                "scheduler_pass",
                created=result.created,
                rescheduled=result.rescheduled,
                cancelled=result.cancelled,
                invalid=len(result.invalid),
            )
        return result

    async def _plan_missing(self, conn: Connection, now: datetime, result: SchedulerResult) -> int:
        created, after_id = 0, ""
        while True:
            cur = await conn.execute(
                _Q["list_projects_without_open_item"],
                {"after_id": after_id, "limit": self._batch_size},
            )
            rows = await cur.fetchall()
            if not rows:
                return created
            after_id = rows[-1]["id"]
            planned = _plan_rows(rows, now, result)
            if planned:
                created += await _insert_planned(conn, planned, self._lead_seconds)

    async def _reschedule_stale(
        self, conn: Connection, now: datetime, result: SchedulerResult
    ) -> int:
        moved, after_id = 0, ""
        while True:
            cur = await conn.execute(
                _Q["list_stale_pending_items"], {"after_id": after_id, "limit": self._batch_size}
            )
            rows = await cur.fetchall()
            if not rows:
                return moved
            after_id = rows[-1]["id"]
            planned = [(row, plan) for row, plan in _plan_rows(rows, now, result, key="project_id")]
            if not planned:
                continue
            async with conn.transaction():
                cur = await conn.execute(
                    _Q["reschedule_items"],
                    {
                        "ids": [row["id"] for row, _ in planned],
                        "scheduled_for": [p.scheduled_for for _, p in planned],
                        "metadata": [Jsonb(p.metadata) for _, p in planned],
                        "lead_seconds": self._lead_seconds,
                    },
                )
                changed = await cur.fetchall()
                await _cache(conn, changed)
            moved += len(changed)


def _plan_rows(
    rows: list[dict[str, Any]], now: datetime, result: SchedulerResult, key: str = "id"
) -> list[tuple[dict[str, Any], PlannedItem]]:
    planned = []
    for row in rows:
        try:
            plan = plan_next_item(row["cadence_config"], row["delivery_time"], row["timezone"], now)
            generated = row.get("generated_slot")
            if generated is not None and plan.scheduled_for == generated:
                # That slot's episode exists (generated in the lead window, published at the
                # instant): plan the one after it, or the project would get two.
                plan = plan_next_item(row["cadence_config"], row["delivery_time"],
                                      row["timezone"], generated)
        except CadenceError as exc:
            result.invalid[row[key]] = str(exc)
            continue
        planned.append((row, plan))
    return planned


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


async def insert_next_item(
    conn: Connection, *, project_id: str, organization_id: str, plan: PlannedItem,
    lead_seconds: float = 0.0,
) -> datetime | None:
    """Insert one planned item and refresh the project's cache, inside the caller's
    transaction. Returns its due time, or None when the project already has an open item."""
    row = await _insert_item(conn, project_id=project_id, organization_id=organization_id,
                             plan=plan, lead_seconds=lead_seconds)
    return None if row is None else row["scheduled_for"]


async def _insert_item(
    conn: Connection, *, project_id: str, organization_id: str, plan: PlannedItem,
    lead_seconds: float,
) -> dict[str, Any] | None:
    cur = await conn.execute(
        _Q["insert_next_item"],
        {
            "id": new_id("queue"),
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

    The item is due at ``at`` (published then) and claimable ``lead_seconds`` before it.

    Refuses when the project already has an open item, unless ``replace`` cancels the waiting
    one (an item being processed is never replaced). Returns the new item's id and due time.
    The new item (and a replaced one) is audited under ``actor``.
    """
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
                {"id": project["open_item_id"], "reason": "replaced by mf-worker enqueue"},
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
        row = await _insert_item(conn, project_id=project_id,
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
