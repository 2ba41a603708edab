"""Retention: completed and cancelled queue items are deleted once they are old enough.

The queue is a hot, update-heavy table; keeping it small keeps claims fast. Episodes, usage and
audit rows are never touched here: the queue row is only the scheduling record.
"""

from __future__ import annotations

from .. import queue
from ..db import Pool
from .loops import PeriodicLoop


class Pruner(PeriodicLoop):
    """Deletes completed and cancelled items past the retention, a small batch at a time."""

    name = "pruner"
    BATCH = 500
    MAX_BATCHES_PER_PASS = 20

    def __init__(self, pool: Pool, *, retention_days: int,
                 interval: float = 300.0) -> None:
        super().__init__(interval)
        self._pool = pool
        self._retention_days = retention_days

    async def run_once(self) -> int:
        deleted = 0
        for _ in range(self.MAX_BATCHES_PER_PASS):
            async with self._pool.connection() as conn:
                batch = await queue.prune_finished_items(
                    conn, retention_days=self._retention_days, limit=self.BATCH
                )
            deleted += batch
            if batch < self.BATCH:
                break
        if deleted:
            self._log.info("items_pruned", deleted=deleted)
        return deleted
