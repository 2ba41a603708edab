"""Reading what generations need, and writing what they produced — a batch per transaction.

``prepare_generations`` loads each item's context, reserves its worst-case cost and makes sure
its episode row exists (from the first attempt, so its history survives retries).
``write_episodes`` is the final write: per item, the episode, blocks, usage, notes, memories,
audit row, user event, the item completed and the project's next item — one statement, fenced
on the claim, so an item whose lease was lost writes nothing while the rest of its batch
commits. Both send a whole batch in one pipelined transaction that acts for each item's
organisation in turn (row-level security rejects a row of any other organisation), in
organisation order so that batches of different workers take the aggregate rows' locks in the
same order. ``write_failure`` and ``cancel_item`` record the other outcomes, one item at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from .. import cost, queue
from ..cost import CostLimitReached
from ..db import Connection, act_for, as_org
from ..db.sql import load_queries
from ..errors import InvalidItemError, LeaseLost
from ..generation import (
    GenerationRequest,
    GenerationResult,
    Memory,
    PlanningNote,
    PreviousEpisode,
    ProjectInfo,
    TokenUsage,
)
from ..ids import new_id
from ..queue import ClaimedItem
from ..scheduling.cadence import CadenceError, zone_for
from ..scheduling.scheduler import PlannedItem, plan_next_item

_Q = load_queries(__package__ or "mf_worker.engine", "episodes.sql")

MAX_NOTES = 50
MAX_MEMORIES = 50
MAX_PREVIOUS_EPISODES = 3


class ItemUnavailable(InvalidItemError):
    """The item's project was deleted, paused or archived: the item is cancelled, not failed."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything the final write needs besides the generator's result."""

    request: GenerationRequest
    episode_id: str
    new_episode: bool  # no earlier attempt (nor an earlier run of this prepare) created it
    user_id: str
    cadence_config: Any
    delivery_time: time
    timezone: str
    # The UTC day the reservation was taken (the database's clock): the attempt's usage is
    # filed under it, whenever it is written. Set by the reservation.
    billing_day: date | None = None
    reserved_gbp: Decimal = Decimal(0)  # the worst case reserved for this attempt


@dataclass(frozen=True, slots=True)
class EpisodeWrite:
    """One successful generation, validated and priced, waiting for its final write."""

    item: ClaimedItem
    prepared: Prepared
    result: GenerationResult
    costs: tuple[Decimal, ...]  # GBP per usage of ``result``
    now: datetime
    lead_seconds: float = 0.0  # the next item is claimable this long before it is due


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


# What one item of a batch came to: a value, or the exception that explains why not.
PrepareOutcome = Prepared | ItemUnavailable | InvalidItemError | CostLimitReached | LeaseLost
WriteOutcome = Delivery | LeaseLost


def _org_order(items: Sequence[ClaimedItem]) -> list[int]:
    """Indexes of ``items`` by organisation: one setting per organisation, and the same lock
    order on the aggregate rows in every batch of every worker (no deadlock between them)."""
    return sorted(range(len(items)), key=lambda i: (items[i].organization_id, items[i].id))


async def prepare_generations(
    conn: Connection,
    items: Sequence[ClaimedItem],
    *,
    now: datetime | None,
    worst_case: Callable[[GenerationRequest], Decimal],
    default_limit: Decimal,
) -> list[PrepareOutcome]:
    """Prepare a batch of claimed items in one transaction and two round trips: load every
    context, then reserve every item's worst-case cost (creating its episode at the first
    attempt). One outcome per item, in order: Prepared, or ItemUnavailable (cancel it),
    InvalidItemError (fail it), CostLimitReached (block it; nothing was written for it) or
    LeaseLost. A database error raises for the whole batch, which then wrote nothing.
    Idempotent per claim: run again for the same claims (after a commit whose acknowledgement
    was lost), it finds their reservations and episodes instead of adding new ones. The
    billing day is the database's UTC day (``now`` given: that instant's, for tests).
    """
    outcomes: list[PrepareOutcome | None] = [None] * len(items)
    loads: dict[int, Any] = {}
    reservations: dict[int, tuple[Prepared, cost.PendingReservation]] = {}
    day = now.astimezone(UTC).date() if now is not None else None
    async with conn.pipeline() as pipeline, conn.transaction():
        acting: str | None = None
        for i in _org_order(items):
            item = items[i]
            if item.project_id is None:
                outcomes[i] = ItemUnavailable("project deleted")
                continue
            if item.organization_id != acting:
                acting = item.organization_id
                await act_for(conn, acting)
            loads[i] = await conn.execute(
                _Q["load_generation_context"],
                _context_params(item.project_id, item.episode_id, queue_id=item.id),
            )
        await pipeline.sync()
        acting = None
        for i, cursor in loads.items():  # in org order, as inserted
            item = items[i]
            try:
                prepared = _prepared(item, await cursor.fetchone())
            except InvalidItemError as exc:  # ItemUnavailable too
                outcomes[i] = exc
                continue
            if item.organization_id != acting:
                acting = item.organization_id
                await act_for(conn, acting)
            reservations[i] = (prepared, await cost.reserve(
                conn, item, amount=worst_case(prepared.request), day=day,
                default_limit=default_limit,
                new_episode_id=prepared.episode_id if prepared.new_episode else None,
                sequence_number=prepared.request.episode_number,
            ))
    for i, (prepared, pending) in reservations.items():
        reservation = await pending.result()
        if not isinstance(reservation, cost.Granted):
            outcomes[i] = reservation
            continue
        if reservation.episode_id is not None:  # this claim's earlier run made the episode
            prepared = replace(prepared, episode_id=reservation.episode_id, new_episode=False)
        outcomes[i] = replace(prepared, billing_day=reservation.day,
                              reserved_gbp=reservation.amount)
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def _prepared(item: ClaimedItem, project: dict[str, Any] | None) -> Prepared:
    """The request for ``item`` from its loaded context (raises ItemUnavailable when the
    project is gone or inactive, InvalidItemError when its owner's zone is unknown)."""
    if project is None:
        raise ItemUnavailable("project deleted")
    if project["status"] != "active":
        raise ItemUnavailable(f"project {project['status']}")
    try:
        zone = zone_for(project["timezone"])
    except CadenceError as exc:
        raise InvalidItemError(f"project {item.project_id}: owner's {exc}") from None
    existing = project["existing_episode"]
    number = existing["sequence_number"] if existing else project["last_sequence_number"] + 1
    return Prepared(
        request=build_request(item, project, zone, number),
        episode_id=existing["id"] if existing else new_id("ep"),
        new_episode=existing is None,
        user_id=project["user_id"],
        cadence_config=project["cadence_config"],
        delivery_time=project["delivery_time"],
        timezone=project["timezone"],
    )


def _context_params(
    project_id: str, episode_id: str | None, *, queue_id: str | None = None
) -> dict[str, Any]:
    return {"project_id": project_id, "episode_id": episode_id, "queue_id": queue_id,
            "max_notes": MAX_NOTES, "max_memories": MAX_MEMORIES,
            "max_previous": MAX_PREVIOUS_EPISODES}


async def load_generation_context(
    conn: Connection, project_id: str, episode_id: str | None
) -> dict[str, Any] | None:
    """The project, its owner's zone, pending notes, memories and recent episodes (one round
    trip), inside the caller's as-org transaction; None when the project does not exist.
    Shared by the worker and ``mf-worker generate``, so a preview sees what a worker sees."""
    cur = await conn.execute(_Q["load_generation_context"], _context_params(project_id, episode_id))
    row: dict[str, Any] | None = await cur.fetchone()
    return row


def build_request(
    item: ClaimedItem, project: dict[str, Any], zone: tzinfo, episode_number: int
) -> GenerationRequest:
    memories = [*_project_memories(project["memories"]),
                *(Memory(**m) for m in project["agent_memories"])]
    return GenerationRequest(
        queue_item_id=item.id,
        attempt=item.attempt,
        organization_id=item.organization_id,
        project=ProjectInfo(
            id=project["id"],
            title=project["title"],
            description=project["description"],
            cadence_config=project["cadence_config"],
            timezone=project["timezone"],
        ),
        episode_number=episode_number,
        scheduled_for=item.scheduled_for.astimezone(UTC),
        local_date=item.scheduled_for.astimezone(zone).date(),
        planning_notes=tuple(PlanningNote(**n) for n in project["notes"]),
        memories=tuple(memories),
        previous_episodes=tuple(PreviousEpisode(**e) for e in project["previous_episodes"]),
        # One per claim: a call repeated within the attempt is recognised, while a new attempt
        # is never answered with an earlier attempt's (perhaps broken) reply.
        idempotency_key=f"{item.id}:{item.token}",
    )


def _project_memories(stored: Any) -> list[Memory]:
    """``projects.memories`` as the web app keeps them: strings or objects with ``content``."""
    found: list[Memory] = []
    for entry in stored if isinstance(stored, list) else []:
        if isinstance(entry, str) and entry.strip():
            found.append(Memory(content=entry))
        elif isinstance(entry, dict) and isinstance(entry.get("content"), str):
            importance = entry.get("importance", 0.5)
            found.append(Memory(
                content=entry["content"],
                memory_type=str(entry.get("memory_type") or entry.get("type") or "preference"),
                importance=float(importance) if isinstance(importance, int | float) else 0.5,
            ))
    return found


async def cancel_item(conn: Connection, item: ClaimedItem, *, reason: str) -> bool:
    """Cancel an item whose project is gone or inactive (the queue's trigger fails the episode
    an earlier attempt started); False if the fence no longer holds."""
    async with as_org(conn, item.organization_id):
        return await queue.finish_item(conn, item, status="cancelled", error=reason)


async def write_episodes(conn: Connection, writes: Sequence[EpisodeWrite]) -> list[WriteOutcome]:
    """The final writes of a batch, in one transaction and one round trip; per item, in order,
    its Delivery when written, or LeaseLost when the claim is no longer ours (nothing written).
    A database error raises for the whole batch, which then wrote nothing."""
    cursors: dict[int, Any] = {}
    async with conn.pipeline(), conn.transaction():
        acting: str | None = None
        for i in _org_order([w.item for w in writes]):
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
        "usages": cost.usage_rows(usages, write.costs),
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


async def write_failure(
    conn: Connection,
    item: ClaimedItem,
    prepared: Prepared | None,
    *,
    error: str,
    retry_in: float | None,
    usages: Sequence[TokenUsage] = (),
    costs: Sequence[Decimal] = (),
) -> bool:
    """Record a failed attempt: retry after ``retry_in`` seconds, or fail for good (``retry_in``
    None; the queue's trigger then fails the episode). Settles the attempt's spend in the same
    transaction: its known ``usages`` (priced as ``costs``) are booked on the reservation's day;
    when none are known, the queue's trigger books the reserved worst case as an estimate.
    Raises LeaseLost when the fence no longer holds (nothing written)."""
    episode_id = prepared.episode_id if prepared else item.episode_id
    settled = bool(usages) and prepared is not None
    async with as_org(conn, item.organization_id):
        if retry_in is None:
            held = await queue.finish_item(conn, item, status="failed", error=error,
                                           settled=settled)
        else:
            held = await queue.retry_item(conn, item, delay_seconds=retry_in, error=error,
                                          settled=settled)
        if not held:
            raise LeaseLost(item.id)
        if settled:
            assert prepared is not None
            await cost.settle(conn, item, day=prepared.billing_day, episode_id=episode_id,
                              usages=usages, costs=costs)
        if episode_id is not None:
            await conn.execute(
                _Q["record_episode_error"],
                {"episode_id": episode_id, "error": f"attempt {item.attempt}: {error}"},
            )
    return True


async def write_deferral(
    conn: Connection,
    item: ClaimedItem,
    prepared: Prepared | None,
    *,
    reason: str,
    error: str,
    retry_after: float | None,
    deadline_seconds: float,
    not_after: datetime | None,
    backoff: tuple[float, float, float],
    usages: Sequence[TokenUsage] = (),
    costs: Sequence[Decimal] = (),
) -> queue.Deferral:
    """Put the item back without using up its attempt (``queue.defer_item``). A transient
    failure's call goes into the episode's history and its spend is settled like a failed
    attempt's (known ``usages`` booked, else the reservation booked as an estimate); when the
    item gives up, the queue's trigger fails the episode. A rate limit or an exhausted quota
    is not a call the provider ran: no history, and the reservation is released unbooked.
    Raises LeaseLost when the fence no longer holds (nothing written)."""
    episode_id = prepared.episode_id if prepared else item.episode_id
    settled = reason == "transient" and bool(usages) and prepared is not None
    async with as_org(conn, item.organization_id):
        deferral = await queue.defer_item(
            conn, item, reason=reason, error=error, retry_after=retry_after,
            deadline_seconds=deadline_seconds, not_after=not_after, backoff=backoff,
            settled=settled)
        if deferral is None:
            raise LeaseLost(item.id)
        if settled:
            assert prepared is not None
            await cost.settle(conn, item, day=prepared.billing_day, episode_id=episode_id,
                              usages=usages, costs=costs)
        if episode_id is not None and reason == "transient":
            await conn.execute(
                _Q["record_episode_error"],
                {"episode_id": episode_id, "error": f"attempt {item.attempt}: {error}"},
            )
    return deferral


async def record_lost_attempts(conn: Connection, reaped: list[queue.ReapedItem]) -> None:
    """Add the reaper's verdict to each reaped item's episode history (inside a transaction
    that acts for each item's organisation in turn)."""
    for item in reaped:
        if item.episode_id is None:
            continue
        await act_for(conn, item.organization_id)
        await conn.execute(
            _Q["record_episode_error"],
            {"episode_id": item.episode_id, "error": f"attempt {item.attempt}: {item.error}"},
        )
