"""The queue's depth as the metrics read it at scrape time (and ``mf-worker status`` shows it).

Counts by status, the due items and the oldest one's age, the late items, and the provider
limit keys' buckets: one cross-organisation, read-only reading that costs the same at 10
million rows as at 10,000 (see :func:`read_queue_depth`). Every replica reads the same truth
from the database, so the metrics agree whichever replica is scraped.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from ..db import Connection
from ..db.sql import load_queries
from ..flow import read_limits

_Q = load_queries(__package__ or "mf_worker.observability", "queue_depth.sql")

STATUSES = ("pending", "processing", "completed", "failed", "cancelled", "blocked")

COUNTED_STATUSES = ("processing", "blocked")
# Below this many rows (the planner's estimate) the whole queue is counted exactly; above it
# pending and the finished statuses are estimated, so a scrape costs the same at 10 million
# rows and a million projects as at 10,000.
EXACT_COUNT_BELOW = 100_000


async def read_queue_depth(conn: Connection, *, now: datetime | None = None,
                           exact_below: int = EXACT_COUNT_BELOW) -> dict[str, Any]:
    """Counts by status and the oldest due item's age: what the metrics export.

    Processing and blocked are always exact (partial indexes), and so are the due items and the
    oldest one's age. In a queue of ``exact_below`` rows or more, pending, completed, failed
    and cancelled are estimated from the planner's statistics (the table's size and the status
    column's sampled frequencies), never counted by scanning the history or every project's
    waiting item; below it everything is counted exactly.
    """
    now = now or datetime.now(UTC)
    counts = dict.fromkeys(STATUSES, 0)
    est = await (await conn.execute(_Q["estimate_items_by_status"])).fetchone()
    rows = float(est["rows"]) if est and est["rows"] is not None else -1.0
    if rows < 0 or rows < exact_below or not est or not est["vals"]:
        for row in await (await conn.execute(_Q["count_items_by_status"])).fetchall():
            counts[row["status"]] = row["items"]
    else:
        for value, freq in zip(est["vals"], est["freqs"], strict=True):
            if value in counts and value not in COUNTED_STATUSES:
                counts[value] = round(rows * freq)
        exact = await (await conn.execute(_Q["count_in_flight_items"])).fetchone()
        for status in COUNTED_STATUSES:
            counts[status] = exact[status] if exact else 0
    due = await (await conn.execute(_Q["oldest_due_pending"], {"now": now})).fetchone()
    oldest = due["oldest_due"] if due else None
    late = await (await conn.execute(_Q["count_late_items"], {"now": now})).fetchone()
    return {"counts": counts, "due_items": due["due_items"] if due else 0,
            "oldest_due_age_seconds": max((now - oldest).total_seconds(), 0.0) if oldest
            else None,
            "late_items": late["late_items"] if late else 0,
            "limits": [asdict(k) for k in await read_limits(conn)]}
