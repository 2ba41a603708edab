"""The heartbeat: keeps this worker's claims alive while their generations run.

A claim is a lease with an expiry. The heartbeat extends the leases of every claim in flight in
one statement every third of the lease, skipping rows someone else has locked (renewed on the
next beat) rather than waiting for them; a claim missing from the answer was reaped, cancelled
or taken over, so its generation is abandoned (its write would be refused anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .. import queue
from ..engine.worker import Worker
from .loop import PeriodicLoop, check_positive


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    """How long a claim's lease lasts; the heartbeat renews it three times per lease."""

    # Seconds a lease lasts from each renewal (MF_LEASE_SECONDS).
    lease_seconds: float

    def __post_init__(self) -> None:
        check_positive("heartbeat", lease_seconds=self.lease_seconds)

    @property
    def interval(self) -> float:
        """A third of the lease: two beats may fail before a claim is lost."""
        return self.lease_seconds / 3


class Heartbeat(PeriodicLoop[set[int]]):
    """Extends the leases of the worker's in-flight claims."""

    name = "heartbeat"

    def __init__(self, worker: Worker, config: HeartbeatConfig | None = None) -> None:
        self.config = config or HeartbeatConfig(lease_seconds=worker.settings.lease_seconds)
        super().__init__(self.config.interval)
        self.worker = worker

    async def run_once(self, now: datetime | None = None) -> set[int]:
        """Extend what is held from ``now`` (None: the database's clock); return the claim
        tokens found lost (and abandon their generations). Everything is compared by claim
        token, so an item that this worker claimed again while the statement ran is a
        different claim, never mistaken for the lost one."""
        items = [e.item for e in self.worker.in_flight.values()]
        if not items:
            return set()
        async with self.worker.pool.connection() as conn:
            renewal = await queue.extend_leases(
                conn, items, lease_seconds=self.config.lease_seconds, now=now,
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
