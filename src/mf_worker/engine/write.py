"""The final write of successful generations: a batch per transaction.

``write_episodes`` writes, per item, the episode, blocks, usage, notes, memories, audit row,
user events, the item completed and the project's next item — one statement
(``complete_episode``), fenced on the claim, so an item whose lease was lost writes nothing while
the rest of its batch commits. The batch goes in one pipelined transaction acting for each
item's organisation in turn, in the prepare's organisation order (``prepare.org_order``).

It reads each project as it is at commit (its row locked first, one more round trip per batch),
not as the prepare saw it minutes ago: the next item is planned from the current cadence,
delivery time and zone, skipping slots that already ended; a project paused or archived
meanwhile gets its episode withdrawn and no next item; a project deleted meanwhile has its item
cancelled, with the usage the generator reported booked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from .. import cost, queue
from ..db import Connection, act_for
from ..db.sql import load_queries
from ..errors import LeaseLost
from ..generation import GenerationResult
from ..ids import new_id
from ..queue import ClaimedItem
from ..scheduling.cadence import CadenceError
from ..scheduling.scheduler import PlannedItem, plan_next_item
from .prepare import ItemUnavailable, Prepared, org_order

_Q = load_queries(__package__ or "mf_worker.engine", "write.sql")


@dataclass(frozen=True, slots=True)
class EpisodeWrite:
    """One successful generation, validated and priced, waiting for its final write."""

    item: ClaimedItem
    prepared: Prepared
    result: GenerationResult
    costs: tuple[Decimal, ...]  # GBP per usage of ``result``
    now: datetime
    lead_seconds: float = 0.0  # the next item is claimable this long before it is due
    # What to book, call by call (cost.settlement); None: ``result``'s usages priced as ``costs``.
    bookings: tuple[cost.Booking, ...] | None = None
    # Who wrote it (``primary:openai``, ``fallback:openai``) and with which model.
    generator: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """When a written episode is due, and when it became visible: ``published_at`` None means
    it finished before its instant and is ``scheduled`` (the publisher makes it ready then),
    unless ``withdrawn_reason`` says why it will never be (its project was paused or archived
    while it was generated)."""

    scheduled_for: datetime
    published_at: datetime | None
    withdrawn_reason: str | None = None

    @property
    def lateness_seconds(self) -> float | None:
        """Publish time minus delivery instant (None while not yet published)."""
        if self.published_at is None:
            return None
        return (self.published_at - self.scheduled_for).total_seconds()


# What one item of a batch came to: its delivery, or why not (ItemUnavailable: the project was
# deleted while it generated, and the item is cancelled).
WriteOutcome = Delivery | LeaseLost | ItemUnavailable


async def write_episodes(conn: Connection, writes: Sequence[EpisodeWrite]) -> list[WriteOutcome]:
    """The final writes of a batch, in one transaction and two round trips (read and lock the
    projects, then write); per item, in order, its Delivery when written, LeaseLost when the
    claim is no longer ours (nothing written), or ItemUnavailable when its project was deleted
    (the item cancelled, its known usage booked). A database error raises for the whole batch,
    which then wrote nothing."""
    order = org_order([w.item for w in writes])
    outcomes: list[WriteOutcome | None] = [None] * len(writes)
    cursors: dict[int, Any] = {}
    async with conn.pipeline() as pipeline, conn.transaction():
        reads: dict[int, Any] = {}
        acting: str | None = None
        for i in order:
            write = writes[i]
            if write.item.organization_id != acting:
                acting = write.item.organization_id
                await act_for(conn, acting)
            reads[i] = await conn.execute(_Q["lock_project_for_write"], {
                "project_id": write.item.project_id, "after": _plan_after(write)})
        await pipeline.sync()
        acting = None
        for i in order:
            write = writes[i]
            project = await reads[i].fetchone()
            if write.item.organization_id != acting:
                acting = write.item.organization_id
                await act_for(conn, acting)
            if project is None:
                outcomes[i] = await _cancel_for_deleted_project(conn, write)
                continue
            cursors[i] = await conn.execute(_Q["complete_episode"],
                                            _episode_params(write, project))
    for i, cursor in cursors.items():
        row = await cursor.fetchone()
        outcomes[i] = (Delivery(row["scheduled_for"], row["published_at"],
                                row["withdrawn_reason"])
                       if row and row["held"] else LeaseLost(writes[i].item.id))
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


async def _cancel_for_deleted_project(conn: Connection, write: EpisodeWrite) -> WriteOutcome:
    """The project went while its episode was generated (and the episode with it, by the
    cascade): cancel the item, fenced, and book the usage the generator reported on the
    reservation's day (``cost.settle``; the project's id is gone, so the usage row names
    none). Without reported usage the reservation is booked as an estimate by the queue's
    trigger, as for any cancelled attempt."""
    item, usages = write.item, write.result.usages
    settled = bool(write.bookings if write.bookings is not None else usages)
    if not await queue.finish_item(conn, item, status="cancelled", error="project deleted",
                                   settled=settled):
        return LeaseLost(item.id)
    if settled:  # call by call when the worker settled them (cost.settlement)
        await cost.settle(conn, replace(item, project_id=None), day=write.prepared.billing_day,
                          episode_id=None, bookings=write.bookings, usages=usages,
                          costs=write.costs)
    return ItemUnavailable("project deleted")


def _episode_params(write: EpisodeWrite, project: dict[str, Any]) -> dict[str, Any]:
    item, prepared, result = write.item, write.prepared, write.result
    org, project_id, episode_id = item.organization_id, item.project_id, prepared.episode_id
    blocks, usages, memories = result.blocks, result.usages, result.new_memories
    withdrawn = None if project["status"] == "active" else f"project {project['status']}"
    plan = None if withdrawn else _plan_following_item(write, project)
    summary = {
        "queue_item_id": item.id,
        "attempt": item.attempt,
        "sequence_number": prepared.request.episode_number,
        "blocks": len(blocks),
        "tokens": sum(u.total_tokens for u in usages),
    }
    return {
        **queue.fence(item),
        "episode_id": episode_id,
        "title": result.title,
        "generator": write.generator,
        "model": write.model,
        "organization_id": org,
        "project_id": project_id,
        "user_id": prepared.user_id,
        "blocks": Jsonb([
            {"id": new_id("blk"), "content": b.content, "position": position,
             "reasoning": b.reasoning, "confidence": b.confidence}
            for position, b in enumerate(blocks)
        ]),
        "usages": (cost.usage_rows(usages, write.costs) if write.bookings is None
                   else cost.booking_rows(write.bookings)),
        "note_ids": Jsonb(list(result.incorporated_note_ids)),
        "memories": Jsonb([
            {"id": new_id("mem"), "content": m.content, "memory_type": m.memory_type,
             "importance": m.importance}
            for m in memories
        ]),
        "audit_id": new_id("aud"),
        "summary": json.dumps(summary),
        "event_id": new_id("evt"),
        "ready_event_id": new_id("evt"),
        "event_data": Jsonb({"episode_id": episode_id, "project_id": project_id,
                             "sequence_number": prepared.request.episode_number}),
        "billing_date": prepared.billing_day,
        "withdrawn_reason": withdrawn,
        "withdraw_audit_id": new_id("aud"),
        "next_id": new_id("queue"),
        "next_scheduled_for": plan.scheduled_for if plan else None,
        "next_metadata": Jsonb(plan.metadata if plan else None),
        "lead_seconds": write.lead_seconds,
    }


def _plan_after(write: EpisodeWrite) -> datetime:
    """Missed slots are not caught up: the next delivery is after the later of the due time
    and now, so an outage never ends in a burst of episodes."""
    return max(write.item.scheduled_for, write.now)


def _plan_following_item(write: EpisodeWrite, project: dict[str, Any]) -> PlannedItem | None:
    """The project's next occurrence under its settings at commit, skipping slots that already
    ended; None when its cadence or zone is now invalid (the scheduler reports that project;
    this episode is fine)."""
    try:
        return plan_next_item(project["cadence_config"], project["delivery_time"],
                              project["timezone"], _plan_after(write), project["ended_slots"])
    except CadenceError:
        return None
