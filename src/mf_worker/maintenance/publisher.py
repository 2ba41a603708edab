"""The publisher: episodes finished before their delivery instant become visible at it.

The web app shows episodes whose status is ``ready``. Work may start a lead window before the
delivery instant (``MF_LEAD_SECONDS``), so an episode the final write finishes early is
``scheduled`` instead; this loop makes it ``ready`` at the instant (``published_at``, the
``episode_ready`` user event), woken by a timer set to the next waiting instant — not by the
scheduler's interval — and by the worker when it schedules an earlier one. If the project was
paused, archived, deleted or rescheduled in between (its delivery instant is no longer one of
its occurrences), the episode is withdrawn instead: kept, ``withdrawn`` with the reason, its
usage still booked, and the planning notes it used are pending again for the next episode.

Every daemon runs one; they split the due items (``FOR UPDATE SKIP LOCKED``), and the timer
falls back to ``max_wait`` so an episode scheduled by a daemon that then died is still
published by the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ..db import Pool, act_for
from ..db.sql import load_queries
from ..engine.events import EventHub
from ..ids import new_id
from ..scheduling.cadence import CadenceError, next_occurrence
from .loop import PeriodicLoop, check_positive

_Q = load_queries(__package__ or "mf_worker.maintenance", "publisher.sql")

# Published within this long of its instant, an episode is on time (the timer's promise).
ON_TIME_SECONDS = 1.0
# Never spin faster than this while an instant is near (host and database clocks may differ).
MIN_DELAY = 0.02
# The timer wakes a little after the instant, so the database's clock has reached it too.
TIMER_SLACK = 0.005


@dataclass(frozen=True, slots=True)
class Publication:
    """One episode made visible by the publisher."""

    queue_id: str
    organization_id: str
    episode_id: str | None
    scheduled_for: datetime
    published_at: datetime

    @property
    def lateness_seconds(self) -> float:
        return (self.published_at - self.scheduled_for).total_seconds()


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """One episode withdrawn because its project changed before the instant."""

    queue_id: str
    organization_id: str
    episode_id: str | None
    reason: str


@dataclass
class PublishResult:
    """What one pass did, and when the next episode waits for."""

    published: list[Publication] = field(default_factory=list)
    withdrawn: list[Withdrawal] = field(default_factory=list)
    next_at: datetime | None = None


def withdrawal_reason(row: dict[str, Any]) -> str | None:
    """Why the episode of a due item must not be published, or None to publish it."""
    if row["project_id"] is None or row["project_status"] is None:
        return "project deleted"
    if row["project_status"] != "active":
        return f"project {row['project_status']}"
    metadata = row["metadata"] or {}
    if metadata.get("manual") or "cadence" not in metadata:
        return None  # enqueued by hand or by other software: no slot to compare with
    slot: datetime = row["scheduled_for"]
    try:
        occurrence = next_occurrence(row["cadence_config"], row["delivery_time"],
                                     row["timezone"], slot - timedelta(microseconds=1))
    except CadenceError:
        return None  # the cadence broke after the generation: the episode itself is fine
    return None if occurrence == slot else "project rescheduled"


@dataclass(frozen=True, slots=True)
class PublisherConfig:
    """How long the publisher may sleep, and how much one transaction publishes."""

    # Seconds the timer sleeps at most (MF_POLL_INTERVAL): how soon an episode scheduled by
    # another daemon, which then died, is still published.
    max_wait: float = 5.0
    # Due episodes one transaction publishes or withdraws; a larger burst takes several.
    batch_size: int = 500

    def __post_init__(self) -> None:
        check_positive("publisher", max_wait=self.max_wait, batch_size=self.batch_size)


class Publisher(PeriodicLoop[PublishResult]):
    """Publishes due scheduled episodes; sleeps until the next instant (at most ``max_wait``).
    Each episode made visible is published on the hub as a :class:`Publication`, each one
    withdrawn as a :class:`Withdrawal`."""

    name = "publisher"

    def __init__(
        self,
        pool: Pool,
        config: PublisherConfig | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        events: EventHub | None = None,
    ) -> None:
        self.config = config or PublisherConfig()
        super().__init__(self.config.max_wait)
        self._pool = pool
        self._clock = clock
        self._events = events or EventHub()
        self._timer_at: datetime | None = None  # the instant the timer is set for
        self._batch_size = self.config.batch_size

    async def run_once(self, now: datetime | None = None) -> PublishResult:
        """Publish (or withdraw) every episode whose instant is ``now`` or earlier (None: the
        database's clock); ``published_at`` is ``now``."""
        result = PublishResult()
        while True:
            published, withdrawn, full = await self._publish_batch(now)
            result.published += published
            result.withdrawn += withdrawn
            if not full:
                break
        async with self._pool.connection() as conn:
            row = await (await conn.execute(_Q["next_publication_at"])).fetchone()
        result.next_at = row["due_at"] if row else None
        self._timer_at = result.next_at
        for withdrawal in result.withdrawn:
            self._events.publish(withdrawal)  # logged as episode_withdrawn (event_log)
        for publication in result.published:
            self._events.publish(publication)
        if result.published:
            self._log.info("episodes_published", published=len(result.published),
                           latest_seconds=round(max(p.lateness_seconds
                                                    for p in result.published), 3))
        return result

    async def _publish_batch(
        self, now: datetime | None
    ) -> tuple[list[Publication], list[Withdrawal], bool]:
        published: list[Publication] = []
        withdrawn: list[Withdrawal] = []
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(_Q["list_due_publications"],
                                     {"now": now, "limit": self._batch_size})
            rows = await cur.fetchall()
            pending: list[tuple[dict[str, Any], Any]] = []
            # One round trip for the batch; organisation order: one setting per organisation.
            async with conn.pipeline():
                acting: str | None = None
                for row in sorted(rows, key=lambda r: (r["organization_id"], r["id"])):
                    if row["organization_id"] != acting:
                        acting = row["organization_id"]
                        await act_for(conn, acting)
                    reason = withdrawal_reason(row)
                    if reason is not None:
                        await conn.execute(_Q["withdraw_episode"], {
                            "id": row["id"], "episode_id": row["episode_id"], "reason": reason,
                            "organization_id": acting, "audit_id": new_id("aud"),
                        })
                        withdrawn.append(Withdrawal(row["id"], row["organization_id"],
                                                    row["episode_id"], reason))
                        continue
                    pending.append((row, await conn.execute(_Q["publish_episode"], {
                        "id": row["id"], "episode_id": row["episode_id"], "now": now,
                        "event_id": new_id("evt"), "user_id": row["user_id"],
                        "organization_id": acting,
                    })))
            for row, cursor in pending:
                done = await cursor.fetchone()
                if done is not None and done["published_at"] is not None:
                    published.append(Publication(
                        row["id"], row["organization_id"], row["episode_id"],
                        row["scheduled_for"], done["published_at"]))
        return published, withdrawn, len(rows) == self._batch_size

    def expect(self, instant: datetime) -> None:
        """An episode now waits for ``instant``: run a pass to reset the timer if it is set
        later (or not at all). A burst of episodes for one instant wakes the loop once."""
        if self._timer_at is None or instant < self._timer_at:
            self._timer_at = instant
            self.wake()

    def next_delay(self, result: PublishResult) -> float:
        """Until the next waiting instant, but at most ``max_wait`` (the interval)."""
        if result.next_at is None:
            return self.interval
        until = (result.next_at - self._clock()).total_seconds() + TIMER_SLACK
        return min(self.interval, max(until, MIN_DELAY))
