"""What a generation reads, and the request built from it.

One query loads a project's context — the project, its owner's zone, pending planning notes,
memories and recent episodes — and :func:`build_request` turns it into the generator's
``GenerationRequest``. Shared by the worker's prepare and ``mf-worker generate`` (the preview),
so a preview sees what a worker sees.
"""

from __future__ import annotations

from datetime import UTC, tzinfo
from typing import Any

from psycopg import AsyncCursor

from ..db import Connection
from ..db.sql import load_queries
from ..generation import GenerationRequest, Memory, PlanningNote, PreviousEpisode, ProjectInfo
from ..queue import ClaimedItem

_Q = load_queries(__package__ or "mf_worker.engine", "context.sql")

MAX_NOTES = 50
MAX_MEMORIES = 50
MAX_PREVIOUS_EPISODES = 3


async def query_generation_context(
    conn: Connection, project_id: str, episode_id: str | None, *, queue_id: str | None = None
) -> AsyncCursor[dict[str, Any]]:
    """Send the context query for one project; its one row (none: no such project) is read
    from the cursor, in a pipeline once it has synced. ``queue_id``: the item being prepared,
    whose queue row names the episode an earlier attempt created (else ``episode_id``)."""
    return await conn.execute(
        _Q["load_generation_context"],
        {"project_id": project_id, "episode_id": episode_id, "queue_id": queue_id,
         "max_notes": MAX_NOTES, "max_memories": MAX_MEMORIES,
         "max_previous": MAX_PREVIOUS_EPISODES},
    )


async def load_generation_context(
    conn: Connection, project_id: str, episode_id: str | None
) -> dict[str, Any] | None:
    """The project, its owner's zone, pending notes, memories and recent episodes (one round
    trip), inside the caller's as-org transaction; None when the project does not exist."""
    cur = await query_generation_context(conn, project_id, episode_id)
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
