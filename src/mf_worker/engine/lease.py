"""Leases: the heartbeat that keeps this worker's claims alive, and the reaper that returns the
claims of workers that died.

A claim is a lease with an expiry. The heartbeat extends the leases of every claim in flight in
one statement every third of the lease, skipping rows someone else has locked (renewed on the
next beat) rather than waiting for them; a claim missing from the answer was reaped, cancelled
or taken over, so its generation is abandoned. The reaper (in every daemon; concurrent reapers
skip each other's rows) returns items whose lease expired to pending, or to failed when their
attempts are used up, and records the lost attempt in the episode's history.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import queue
from ..db import Pool
from ..logs import bind_item
from .failures import record_lost_attempts
from .loops import PeriodicLoop
from .worker import Worker


class Heartbeat(PeriodicLoop):
    """Extends the leases of the worker's in-flight claims."""

    name = "heartbeat"

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker.settings.lease_seconds / 3)
        self.worker = worker

    async def run_once(self) -> set[int]:
        """Extend what is held; return the claim tokens found lost (and abandon their
        generations). Everything is compared by claim token, so an item that this worker
        claimed again while the statement ran is a different claim, never mistaken for the
        lost one."""
        items = [e.item for e in self.worker.in_flight.values()]
        if not items:
            return set()
        async with self.worker.pool.connection() as conn:
            renewal = await queue.extend_leases(
                conn, items, lease_seconds=self.worker.settings.lease_seconds,
            )
        lost = {i.token for i in items} - renewal.held
        # Claims that finished while the statement ran are not lost, merely gone.
        lost &= set(self.worker.in_flight)
        for token in lost:
            item = self.worker.in_flight[token].item
            self._log.warning("lease_lost", queue_id=item.id, attempt=item.attempt)
        if renewal.skipped:
            self._log.info("lease_renewal_skipped", locked_elsewhere=len(renewal.skipped))
        self.worker.abandon_lost(lost)
        return lost


class Reaper(PeriodicLoop):
    """Returns items whose lease expired (their worker crashed, froze or lost the network)."""

    name = "reaper"

    def __init__(
        self,
        pool: Pool,
        *,
        lease_seconds: float,
        max_attempts: int,
        on_reaped: Callable[[queue.ReapedItem], None] | None = None,
    ) -> None:
        super().__init__(min(30.0, max(0.5, lease_seconds / 4)))
        self._pool = pool
        self._max_attempts = max_attempts
        self._on_reaped = on_reaped

    async def run_once(self) -> list[queue.ReapedItem]:
        async with self._pool.connection() as conn, conn.transaction():
            reaped = await queue.reap_expired_leases(conn, max_attempts=self._max_attempts)
            await record_lost_attempts(conn, reaped)
        for item in reaped:
            with bind_item(queue_id=item.id, organization_id=item.organization_id,
                           attempt=item.attempt):
                self._log.warning("item_reaped", status=item.status, error=item.error)
            if self._on_reaped is not None:
                self._on_reaped(item)
        return reaped
