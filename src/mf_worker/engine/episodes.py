"""Reading what a generation needs, and writing what it produced — each in one transaction.

``prepare_generation`` loads the project's context and makes sure the episode row exists (from
the first attempt, so its history survives retries). ``write_episode`` is the final write: the
episode, blocks, usage, notes, memories, audit row, user event, the item completed and the
project's next item, all or nothing, fenced on the claim. ``write_failure`` and ``cancel_item``
record the other outcomes. All run as the item's organisation, so row-level security rejects a
row of any other organisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, tzinfo
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from .. import queue
from ..cost.budget import reserve_budget
from ..db import Connection, as_org
from ..db.sql import load_queries
from ..errors import InvalidItemError
from ..generation import (
    GenerationRequest,
    GenerationResult,
    Memory,
    PlanningNote,
    PreviousEpisode,
    ProjectInfo,
)
from ..ids import new_id
from ..queue import ClaimedItem
from ..scheduling.cadence import CadenceError, zone_for
from ..scheduling.scheduler import PlannedItem, insert_next_item, plan_next_item

_Q = load_queries(__package__ or "mf_worker.engine", "episodes.sql")

MAX_NOTES = 50
MAX_MEMORIES = 50
MAX_PREVIOUS_EPISODES = 3


class ItemUnavailable(InvalidItemError):
    """The item's project was deleted, paused or archived: the item is cancelled, not failed."""


class LeaseLost(Exception):
    """The fence no longer holds: another worker (or the reaper) owns this item now."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything the final write needs besides the generator's result."""

    request: GenerationRequest
    episode_id: str
    user_id: str
    cadence_config: Any
    delivery_time: time
    timezone: str


async def prepare_generation(
    conn: Connection,
    item: ClaimedItem,
    *,
    worker: str,
    now: datetime,
    worst_case: Callable[[GenerationRequest], Decimal],
    default_limit: Decimal,
) -> Prepared:
    """Load the context, reserve the worst-case cost, and ensure the episode row — one
    transaction, so a refused reservation leaves nothing behind.

    Raises ItemUnavailable (cancel), InvalidItemError (a permanent failure, e.g. a bad zone),
    CostLimitReached (block) or LeaseLost.
    """
    if item.project_id is None:
        raise ItemUnavailable("project deleted")
    async with as_org(conn, item.organization_id):
        project = await load_generation_context(conn, item.project_id, item.episode_id)
        if project is None:
            raise ItemUnavailable("project deleted")
        if project["status"] != "active":
            raise ItemUnavailable(f"project {project['status']}")
        try:
            zone = zone_for(project["timezone"])
        except CadenceError as exc:
            raise InvalidItemError(f"project {item.project_id}: owner's {exc}") from None

        existing = project["existing_episode"]
        request = build_request(item, project, zone, existing["sequence_number"] if existing
                           else project["last_sequence_number"] + 1)
        amount, day = worst_case(request), now.astimezone(UTC).date()
        episode_id = existing["id"] if existing else new_id("ep")
        cur = await conn.execute(
            _Q["start_attempt"],
            {"new_episode_id": None if existing else episode_id, "project_id": item.project_id,
             "organization_id": item.organization_id, "sequence_number": request.episode_number,
             "amount": amount, "date": day, "id": item.id, "attempt": item.attempt,
             "worker": worker},
        )
        if await cur.fetchone() is None:
            raise LeaseLost(item.id)
        # Raises CostLimitReached: the episode row and the note above roll back with it.
        await reserve_budget(conn, item, amount=amount, day=day, default_limit=default_limit)
    return Prepared(
        request=request,
        episode_id=episode_id,
        user_id=project["user_id"],
        cadence_config=project["cadence_config"],
        delivery_time=project["delivery_time"],
        timezone=project["timezone"],
    )


async def load_generation_context(
    conn: Connection, project_id: str, episode_id: str | None
) -> dict[str, Any] | None:
    """The project, its owner's zone, pending notes, memories and recent episodes (one round
    trip), inside the caller's as-org transaction; None when the project does not exist.
    Shared by the worker and ``mf-worker generate``, so a preview sees what a worker sees."""
    cur = await conn.execute(
        _Q["load_generation_context"],
        {"project_id": project_id, "episode_id": episode_id, "max_notes": MAX_NOTES,
         "max_memories": MAX_MEMORIES, "max_previous": MAX_PREVIOUS_EPISODES},
    )
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
        # Stable across retries of the item, so a provider can recognise a repeated call.
        idempotency_key=item.id,
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


async def cancel_item(conn: Connection, item: ClaimedItem, *, reason: str, worker: str) -> bool:
    """Cancel an item whose project is gone or inactive; False if the fence no longer holds."""
    async with as_org(conn, item.organization_id):
        return await queue.finish_item(
            conn, item, worker=worker, status="cancelled", error=reason
        )


async def write_episode(
    conn: Connection,
    item: ClaimedItem,
    prepared: Prepared,
    result: GenerationResult,
    *,
    costs: Sequence[Decimal],
    worker: str,
    now: datetime,
) -> datetime | None:
    """The final write, all in one transaction; returns the next item's due time (or None).

    The fenced completion goes first: it takes the item's row lock, so a reaper or another
    worker cannot act on the item while the rest is written, and if the fence fails nothing
    else is. Raises LeaseLost (and writes nothing) when the claim is no longer ours.
    """
    org, project_id, episode_id = item.organization_id, item.project_id, prepared.episode_id
    usages = result.usages
    plan = _plan_following_item(item, prepared, now)
    summary = {
        "queue_item_id": item.id,
        "attempt": item.attempt,
        "sequence_number": prepared.request.episode_number,
        "blocks": len(result.blocks),
        "tokens": sum(u.total_tokens for u in usages),
    }
    # The fenced completion is first, so it takes the item's row lock before anything else is
    # written; when it matched nothing the whole transaction is rolled back.
    async with as_org(conn, org):
        if not await queue.complete_item(conn, item, worker=worker, episode_id=episode_id):
            raise LeaseLost(item.id)
        await conn.execute(
            _Q["write_episode"],
            {
                "episode_id": episode_id,
                "title": result.title,
                "organization_id": org,
                "project_id": project_id,
                "user_id": prepared.user_id,
                "block_ids": [new_id("blk") for _ in result.blocks],
                "contents": [b.content for b in result.blocks],
                "positions": list(range(len(result.blocks))),
                "reasonings": [b.reasoning for b in result.blocks],
                "confidences": [b.confidence for b in result.blocks],
                "usage_ids": [new_id("tok") for _ in usages],
                "models": [u.model for u in usages],
                "prompt_tokens": [u.prompt_tokens for u in usages],
                "completion_tokens": [u.completion_tokens for u in usages],
                "costs": list(costs),
                "note_ids": list(result.incorporated_note_ids),
                "memory_ids": [new_id("mem") for _ in result.new_memories],
                "memory_contents": [m.content for m in result.new_memories],
                "memory_types": [m.memory_type for m in result.new_memories],
                "importances": [m.importance for m in result.new_memories],
                "audit_id": new_id("aud"),
                "summary": json.dumps(summary),
                "event_id": new_id("evt"),
                "event_data": Jsonb({"episode_id": episode_id, "project_id": project_id,
                                     "sequence_number": prepared.request.episode_number}),
            },
        )
        if plan is None:
            return None
        assert project_id is not None
        return await insert_next_item(conn, project_id=project_id, organization_id=org,
                                      plan=plan)


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
    episode_id: str | None,
    *,
    error: str,
    retry_in: float | None,
    worker: str,
) -> bool:
    """Record a failed generator call: retry after ``retry_in`` seconds, or fail for good
    (``retry_in`` None). False when the fence no longer holds (nothing written)."""
    async with as_org(conn, item.organization_id):
        if retry_in is None:
            held = await queue.finish_item(conn, item, worker=worker, status="failed",
                                           error=error)
        else:
            held = await queue.retry_item(conn, item, worker=worker, delay_seconds=retry_in,
                                          error=error)
        if not held:
            raise LeaseLost(item.id)
        if episode_id is not None:
            await conn.execute(
                _Q["record_episode_error"],
                {"episode_id": episode_id, "error": f"attempt {item.attempt}: {error}",
                 "final": retry_in is None},
            )
    return True


async def record_lost_attempts(conn: Connection, reaped: list[queue.ReapedItem]) -> None:
    """Add the reaper's verdict to each reaped item's episode history (inside a transaction
    that acts for each item's organisation in turn)."""
    for item in reaped:
        if item.episode_id is None:
            continue
        await conn.execute(
            "SELECT set_config('app.current_org_id', %s, true)", [item.organization_id]
        )
        await conn.execute(
            _Q["record_episode_error"],
            {"episode_id": item.episode_id, "error": f"attempt {item.attempt}: {item.error}",
             "final": item.status == "failed"},
        )
