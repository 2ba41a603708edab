"""`mf-worker generate`: what a generator returns for a project, without writing anything.

For prompt work and plugin development. The request is built the way the engine builds it for
the project's next attempt — the engine's own context query and request builder, the open
queue item's due time and episode number when there is one — inside a READ ONLY transaction,
with no claim, no budget reservation and no episode row. The generator's answer goes through
the same `validate_result` as in the worker; nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..db import Connection, act_for
from ..db.sql import load_queries
from ..engine import context
from ..errors import InvalidItemError, MfWorkerError
from ..generation.api import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    InvalidOutputError,
    RetryableGenerationError,
    TokenUsage,
    estimate_max_usage,
)
from ..generation.validate import validate_result
from ..logs import get_logger
from ..queue import ClaimedItem
from ..scheduling.cadence import CadenceError, zone_for

__all__ = ["Preview", "build_preview_request", "preview_to_json", "render_preview", "run_preview"]

_Q = load_queries(__package__ or "mf_worker.cli", "preview.sql")


@dataclass(frozen=True, slots=True)
class Preview:
    """A generator's validated answer to one request, with what it cost."""

    generator: str
    request: GenerationRequest
    result: GenerationResult
    costs: tuple[Decimal, ...]
    worst_case: TokenUsage | None


async def build_preview_request(
    conn: Connection, project_id: str, *, now: datetime | None = None
) -> GenerationRequest:
    """The `GenerationRequest` the engine would build for `project_id`'s next attempt.

    Uses the project's open queue item (due time, attempt, episode number of an earlier
    attempt) when there is one, else "due now" and the next episode number. The idempotency
    key is a fresh preview key, never the item's, so a provider that deduplicates cannot later
    answer the real generation with this preview's reply. Raises `MfWorkerError` for an unknown
    project and `InvalidItemError` for an owner's unknown time zone.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    async with conn.transaction():
        await conn.execute("SET TRANSACTION READ ONLY")
        cur = await conn.execute(_Q["find_project"], {"project_id": project_id})
        found = await cur.fetchone()
        if found is None:
            raise MfWorkerError(f"no project {project_id!r}")
        org = found["organization_id"]
        await act_for(conn, org)
        project = await context.load_generation_context(conn, project_id, None)
        cur = await conn.execute(_Q["open_item"], {"project_id": project_id})
        item_row = await cur.fetchone()
    if project is None:
        raise MfWorkerError(f"no project {project_id!r}")
    if project["status"] != "active":
        get_logger("mf_worker.generate").warning(
            "project_not_active", project_id=project_id, status=project["status"],
            detail="the worker would cancel its items; previewing anyway",
        )
    try:
        zone = zone_for(project["timezone"])
    except CadenceError as exc:
        raise InvalidItemError(f"project {project_id}: owner's {exc}") from None

    if item_row is not None:
        item_id, scheduled_for = item_row["id"], item_row["scheduled_for"]
        attempt = item_row["attempt_count"] + (0 if item_row["status"] == "processing" else 1)
        number = item_row["sequence_number"] or project["last_sequence_number"] + 1
    else:
        item_id, scheduled_for, attempt = "preview", now, 1
        number = project["last_sequence_number"] + 1
    item = ClaimedItem(
        id=item_id, token=0, project_id=project_id, organization_id=org,
        scheduled_for=scheduled_for, run_after=scheduled_for, attempt=max(attempt, 1),
        episode_id=None, metadata={}, lease_expires_at=now,
    )
    # The engine's own request builder: the same fields, the same memory handling.
    request = context.build_request(item, project, zone, number)
    return replace(request, idempotency_key=f"preview-{uuid.uuid4().hex}")


async def run_preview(
    generator: Generator,
    request: GenerationRequest,
    *,
    generator_name: str,
    timeout: float,  # noqa: ASYNC109 - the worker's MF_GENERATION_TIMEOUT, applied the same way
    max_episode_bytes: int,
    price: Any,
) -> Preview:
    """Call the generator as the worker does (same timeout, same validation), store nothing.

    Raises `MfWorkerError` saying whether the failure would be retried by the worker.
    """
    worst_case = estimate_max_usage(generator, request)
    try:
        raw = await asyncio.wait_for(generator.generate(request), timeout)
        result = validate_result(raw, request, max_episode_bytes=max_episode_bytes)
    except TimeoutError:
        raise MfWorkerError(
            f"generation timed out after {timeout:g} s (the worker would retry)"
        ) from None
    except InvalidOutputError as exc:
        raise MfWorkerError(f"invalid output (the worker would fail the item): {exc}") from None
    except RetryableGenerationError as exc:
        after = f", retry after {exc.retry_after:g} s" if exc.retry_after is not None else ""
        raise MfWorkerError(
            f"generation failed (the worker would retry{after}): {exc}"
        ) from None
    except GenerationError as exc:
        raise MfWorkerError(
            f"generation failed (the worker would fail the item): {exc}"
        ) from None
    finally:
        close = getattr(generator, "aclose", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()
    costs = tuple(price(usage) for usage in result.usages)
    return Preview(generator=generator_name, request=request, result=result, costs=costs,
                   worst_case=worst_case)


def preview_to_json(preview: Preview) -> dict[str, Any]:
    """The preview as JSON-ready data (``generate --json``)."""
    request, result = preview.request, preview.result
    notes = {note.id: note.note for note in request.planning_notes}
    worst = preview.worst_case
    return {
        "generator": preview.generator,
        "project_id": request.project.id,
        "episode_number": request.episode_number,
        "local_date": request.local_date.isoformat(),
        "scheduled_for": request.scheduled_for.isoformat(),
        "title": result.title,
        "blocks": [
            {"content": b.content, "reasoning": b.reasoning, "confidence": b.confidence}
            for b in result.blocks
        ],
        "usage": [
            {"model": u.model, "prompt_tokens": u.prompt_tokens,
             "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
             "cost_gbp": str(cost)}
            for u, cost in zip(result.usages, preview.costs, strict=True)
        ],
        "worst_case_usage": None if worst is None else {
            "model": worst.model, "prompt_tokens": worst.prompt_tokens,
            "completion_tokens": worst.completion_tokens,
        },
        "incorporated_notes": [
            {"id": note_id, "note": notes.get(note_id, "")}
            for note_id in result.incorporated_note_ids
        ],
        "new_memories": [
            {"content": m.content, "memory_type": m.memory_type, "importance": m.importance}
            for m in result.new_memories
        ],
        "written": False,
    }


def render_preview(preview: Preview) -> str:
    """The preview as readable text (``generate``)."""
    request, result = preview.request, preview.result
    day = request.local_date
    lines = [
        f"Project {request.project.id}, episode {request.episode_number} for "
        f"{day.isoformat()} ({request.project.timezone}), generator {preview.generator}",
        "",
        f"# {result.title}",
    ]
    for index, block in enumerate(result.blocks, start=1):
        confidence = "—" if block.confidence is None else f"{block.confidence:.2f}"
        lines += ["", f"--- block {index} (confidence {confidence}) ---", block.content.rstrip()]
        if block.reasoning:
            lines.append(f"  why: {block.reasoning}")
    lines += ["", "Usage:"]
    for usage, cost in zip(result.usages, preview.costs, strict=True):
        lines.append(
            f"  {usage.model}: {usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} "
            f"completion = {usage.total_tokens:,} tokens, £{cost}"
        )
    if preview.worst_case is not None:
        worst = preview.worst_case
        lines.append(f"  (worst case reserved: {worst.prompt_tokens:,} prompt + "
                     f"{worst.completion_tokens:,} completion tokens)")
    notes = {note.id: note.note for note in request.planning_notes}
    lines += ["", f"Incorporated notes ({len(result.incorporated_note_ids)} of "
                  f"{len(request.planning_notes)} pending):"]
    lines += [f"  {note_id}: {notes.get(note_id, '')}" for note_id in result.incorporated_note_ids]
    if not result.incorporated_note_ids:
        lines.append("  none")
    lines += ["", "New memories:"]
    lines += [f"  ({m.memory_type}, importance {m.importance:g}) {m.content}"
              for m in result.new_memories]
    if not result.new_memories:
        lines.append("  none")
    lines += ["", "Nothing was written to the database."]
    return "\n".join(lines)
