"""The memory migration: ``projects.memories`` (a JSON array) into the ``agent_memory`` table.

The seed kept a project's memories as JSON on the project with a "migration script ready but
not executed", to run when a project has 50+ memories, JSON queries pass 100 ms, memories must
be searched, or three months after launch. mf-worker writes new memories to ``agent_memory``
from day one; ``mf-worker memories migrate`` brings the old entries over.

An entry is a string (the content) or an object with ``content`` (or ``text``) and optional
``type``/``memory_type`` (default ``preference``), ``importance`` (0-1, default 0.5) and
``expires_at`` (ISO 8601 with an offset). Anything else is reported by project and index and
skipped. Entries are copied, not removed: ``projects.memories`` is left as it is for the web app
to stop reading. Each copied row records its origin in ``agent_memory.source`` (a hash of the
entry), unique per project, so running the command twice, or again after an interrupted run,
copies nothing twice. Writes go in batches, each its own transaction acting for the project's
organisation (row-level security). ``memory_migrations`` records how far each project got,
which ``status`` reads across organisations (agent_memory is tenant content it cannot see).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

from psycopg.types.json import Jsonb

from .db import Connection, as_org
from .db.sql import load_queries
from .errors import MfWorkerError

__all__ = ["TRIGGER_MEMORIES", "MemoryEntry", "ProjectReport", "migrate_memories",
           "parse_entry", "read_migration_triggers"]

_Q = load_queries(__package__ or "mf_worker", "memories.sql")

# The seed's first trigger: a project with this many memories.
TRIGGER_MEMORIES: Final = 50
DEFAULT_TYPE: Final = "preference"
DEFAULT_IMPORTANCE: Final = 0.5


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    """One valid entry, as it goes into agent_memory."""

    index: int
    content: str
    memory_type: str
    importance: float
    expires_at: datetime | None
    source: str

    def to_row(self) -> dict[str, Any]:
        return {"content": self.content, "memory_type": self.memory_type,
                "importance": self.importance, "source": self.source,
                "expires_at": self.expires_at.isoformat() if self.expires_at else None}


def _source(raw: Any) -> str:
    canonical = json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "projects.memories#" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def parse_entry(index: int, raw: Any) -> MemoryEntry:
    """The entry as a memory, or ValueError saying what is wrong with it."""
    if isinstance(raw, str):
        obj: dict[str, Any] = {"content": raw}
    elif isinstance(raw, dict):
        obj = raw
    else:
        kind = "null" if raw is None else type(raw).__name__
        raise ValueError(f"a {kind} is neither a string nor an object with content")
    content = obj.get("content", obj.get("text"))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("content (or text) must be a non-blank string")
    memory_type = obj.get("memory_type", obj.get("type", DEFAULT_TYPE))
    if not isinstance(memory_type, str) or not memory_type.strip():
        raise ValueError("type (or memory_type) must be a non-blank string")
    importance = obj.get("importance", DEFAULT_IMPORTANCE)
    if importance is None:
        importance = DEFAULT_IMPORTANCE
    if (isinstance(importance, bool) or not isinstance(importance, int | float)
            or not math.isfinite(importance) or not 0 <= importance <= 1):
        raise ValueError(f"importance must be a number from 0 to 1, not {importance!r}")
    expires_raw = obj.get("expires_at")
    expires_at: datetime | None = None
    if expires_raw is not None:
        try:
            expires_at = datetime.fromisoformat(str(expires_raw))
        except ValueError:
            raise ValueError(f"expires_at {expires_raw!r} is not an ISO 8601 date-time") from None
        if expires_at.tzinfo is None:
            raise ValueError(f"expires_at {expires_raw!r} has no offset (add Z or +00:00)")
    return MemoryEntry(index, content.strip(), memory_type.strip(), float(importance),
                       expires_at, _source(raw))


@dataclass
class ProjectReport:
    """What the migration did (or, in a dry run, would do) for one project."""

    project_id: str
    organization_id: str
    entries: int
    copied: int = 0
    already: int = 0
    to_copy: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


async def migrate_memories(
    conn: Connection, *, project_id: str | None, min_count: int, dry_run: bool,
    batch_size: int = 500, max_batches: int | None = None,
    on_report: Callable[[ProjectReport], None] | None = None,
) -> list[ProjectReport]:
    """Copy the entries of every project with at least ``min_count`` (or just ``project_id``).
    Stops after ``max_batches`` batches when given (a later run resumes)."""
    if project_id is not None:
        row = await (await conn.execute(_Q["get_project"], {"project_id": project_id}))\
            .fetchone()
        if row is None:
            raise MfWorkerError(f"no project {project_id!r}")
    cur = await conn.execute(_Q["list_projects_with_memories"],
                             {"project_id": project_id, "min_count": min_count})
    projects = await cur.fetchall()
    reports: list[ProjectReport] = []
    batches = 0
    for project in projects:
        if max_batches is not None and batches >= max_batches:
            break
        report = ProjectReport(project["id"], project["organization_id"], project["entries"])
        params = {"project_id": project["id"], "organization_id": project["organization_id"]}
        async with as_org(conn, project["organization_id"]):
            row = await (await conn.execute(_Q["get_project_memories"], params)).fetchone()
            done = {r["source"] for r in await (
                await conn.execute(_Q["list_migrated_sources"], params)).fetchall()}
        pending: list[MemoryEntry] = []
        for index, raw in enumerate(row["memories"] if row else []):
            try:
                entry = parse_entry(index, raw)
            except ValueError as exc:
                report.skipped.append((index, str(exc)))
                continue
            if entry.source in done:
                report.already += 1
            else:
                done.add(entry.source)  # an identical entry later in the list is the same
                pending.append(entry)
        report.to_copy = len(pending)
        if not dry_run:
            complete = True
            for start in range(0, len(pending), batch_size):
                if max_batches is not None and batches >= max_batches:
                    complete = False
                    break
                chunk = pending[start:start + batch_size]
                async with as_org(conn, project["organization_id"]):
                    cur = await conn.execute(_Q["insert_migrated_memories"], {
                        **params, "memories": Jsonb([e.to_row() for e in chunk])})
                    inserted = len(await cur.fetchall())
                report.copied += inserted
                report.already += len(chunk) - inserted  # another run was faster
                batches += 1
            async with as_org(conn, project["organization_id"]):
                await conn.execute(_Q["record_memory_migration"], {
                    **params, "entries": report.entries, "copied": report.copied,
                    "skipped": len(report.skipped), "complete": complete})
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports


def render_report(report: ProjectReport, *, dry_run: bool) -> list[str]:
    """The lines `mf-worker memories migrate` prints for one project."""
    lines = [f"{report.project_id} memories[{index}]: skipped: {reason}"
             for index, reason in report.skipped]
    if dry_run:
        lines.append(f"{report.project_id}: {report.entries} entries, {report.to_copy} to copy, "
                     f"{report.already} already there, {len(report.skipped)} skipped "
                     "(dry run: would copy, wrote nothing)")
    else:
        lines.append(f"{report.project_id}: {report.entries} entries, {report.copied} copied, "
                     f"{report.already} already there, {len(report.skipped)} skipped")
    return lines


async def read_migration_triggers(conn: Connection, *, now: datetime | None = None,
                                  limit: int = 20) -> dict[str, Any]:
    """What `mf-worker status` reports: projects at the 50-memory trigger that no run has
    completed (or whose JSON grew since), and whether three months have passed since launch
    (the first organisation)."""
    now = now or datetime.now(UTC)
    cur = await conn.execute(_Q["list_memory_migration_candidates"],
                             {"min_count": TRIGGER_MEMORIES, "limit": limit})
    projects = [dict(r) for r in await cur.fetchall()]
    launch = await (await conn.execute(_Q["get_launch"], {"now": now})).fetchone()
    launched_on: date | None = launch["launched_on"] if launch else None
    return {
        "min_memories": TRIGGER_MEMORIES,
        "projects": projects,
        "launched_on": launched_on.isoformat() if launched_on else None,
        "three_months_since_launch": bool(launch and launch["three_months"]),
        "unmigrated_projects": launch["unmigrated_projects"] if launch else 0,
    }
