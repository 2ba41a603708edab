"""The reaper: returns the claims of workers that died.

Every daemon runs one (concurrent reapers skip each other's rows). An item whose lease expired —
its worker crashed, froze or lost the network — goes back to pending, or to failed when its
attempts are used up, and the lost attempt is recorded in its episode's history, in the same
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .. import queue
from ..db import Pool
from ..engine.events import EventHub
from ..engine.failures import record_lost_attempts
from .loop import PeriodicLoop, check_positive


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    """When a lease counts as lost, and what a lost attempt costs the item."""

    # Seconds a lease lasts (MF_LEASE_SECONDS): the pass interval follows from it.
    lease_seconds: float
    # Attempts after which a reaped item fails instead of going back to pending.
    max_attempts: int
    # Items one pass returns at most (a mass death is reaped over several passes).
    batch_size: int = 500

    def __post_init__(self) -> None:
        check_positive("reaper", lease_seconds=self.lease_seconds,
                       max_attempts=self.max_attempts, batch_size=self.batch_size)

    @property
    def interval(self) -> float:
        """A quarter of the lease, between 0.5 s and 30 s: a dead worker's items come back
        soon after their lease runs out, without polling a long lease needlessly often."""
        return min(30.0, max(0.5, self.lease_seconds / 4))


class Reaper(PeriodicLoop[list[queue.ReapedItem]]):
    """Returns items whose lease expired; publishes each as a ``queue.ReapedItem``."""

    name = "reaper"

    def __init__(self, pool: Pool, config: ReaperConfig, *,
                 events: EventHub | None = None) -> None:
        self.config = config
        super().__init__(config.interval)
        self._pool = pool
        self._events = events or EventHub()

    async def run_once(self, now: datetime | None = None) -> list[queue.ReapedItem]:
        """Reap the leases expired at ``now`` (None: the database's clock)."""
        async with self._pool.connection() as conn, conn.transaction():
            reaped = await queue.reap_expired_leases(
                conn, max_attempts=self.config.max_attempts, limit=self.config.batch_size,
                now=now)
            await record_lost_attempts(conn, reaped)
        for item in reaped:
            self._events.publish(item)  # the log says item_reaped (observability.event_log)
        return reaped
