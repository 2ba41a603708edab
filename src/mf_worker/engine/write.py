"""The final write of successful generations: a batch per transaction.

``write_episodes`` writes, per item, the episode, blocks, usage, notes, memories, audit row,
user events, the item completed and the project's next item — one statement
(``complete_episode``), fenced on the claim, so an item whose lease was lost writes nothing while
the rest of its batch commits. The batch goes in one pipelined transaction acting for each
item's organisation in turn, in the prepare's organisation order (``prepare.org_order``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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
from .prepare import Prepared, org_order

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


@dataclass(frozen=True, slots=True)
class Delivery:
    """When a written episode is due, and when it became visible: ``published_at`` None means
    it finished before its instant and is ``scheduled`` (the publisher makes it ready then)."""

    scheduled_for: datetime
    published_at: datetime | None

    @property
    def lateness_seconds(self) -> float | None:
        """Publish time minus delivery instant (None while not yet published)."""
        if self.published_at is None:
            return None
        return (self.published_at - self.scheduled_for).total_seconds()


# What one item of a batch came to: its delivery, or why not.
WriteOutcome = Delivery | LeaseLost


async def write_episodes(conn: Connection, writes: Sequence[EpisodeWrite]) -> list[WriteOutcome]:
    """The final writes of a batch, in one transaction and one round trip; per item, in order,
    its Delivery when written, or LeaseLost when the claim is no longer ours (nothing written).
    A database error raises for the whole batch, which then wrote nothing."""
    cursors: dict[int, Any] = {}
    async with conn.pipeline(), conn.transaction():
        acting: str | None = None
        for i in org_order([w.item for w in writes]):
            write = writes[i]
            if write.item.organization_id != acting:
                acting = write.item.organization_id
                await act_for(conn, acting)
            cursors[i] = await conn.execute(_Q["complete_episode"], _episode_params(write))
    outcomes: list[WriteOutcome] = []
    for i, write in enumerate(writes):
        row = await cursors[i].fetchone()
        outcomes.append(Delivery(row["scheduled_for"], row["published_at"])
                        if row and row["held"] else LeaseLost(write.item.id))
    return outcomes


def _episode_params(write: EpisodeWrite) -> dict[str, Any]:
    item, prepared, result = write.item, write.prepared, write.result
    org, project_id, episode_id = item.organization_id, item.project_id, prepared.episode_id
    blocks, usages, memories = result.blocks, result.usages, result.new_memories
    plan = _plan_following_item(item, prepared, write.now)
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
        "next_id": new_id("queue"),
        "next_scheduled_for": plan.scheduled_for if plan else None,
        "next_metadata": Jsonb(plan.metadata if plan else None),
        "lead_seconds": write.lead_seconds,
    }


def _plan_following_item(
    item: ClaimedItem, prepared: Prepared, now: datetime
) -> PlannedItem | None:
    """The project's next occurrence, or None when its cadence or zone is now invalid (the
    scheduler reports that project; this episode is fine)."""
    # Missed slots are not caught up: the next delivery is after the later of the due time and
    # now, so an outage never ends in a burst of episodes.
    after = max(item.scheduled_for, now)
    try:
        return plan_next_item(
            prepared.cadence_config, prepared.delivery_time, prepared.timezone, after
        )
    except CadenceError:
        return None
