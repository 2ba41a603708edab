"""The pruner: completed and cancelled queue items are deleted once they are old enough, except
an item whose episode still waits for its delivery instant or whose slot has not come yet.

The queue is a hot, update-heavy table; keeping it small keeps claims fast. Episodes, usage and
audit rows are never touched here: the queue row is only the scheduling record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .. import queue
from ..db import Pool
from .loop import PeriodicLoop, check_positive


@dataclass(frozen=True, slots=True)
class PrunerConfig:
    """How old a finished item must be, and how much one pass deletes."""

    # Days a completed or cancelled item is kept after it finished (MF_RETENTION_DAYS).
    retention_days: int
    # Seconds between passes.
    interval: float = 300.0
    # Items deleted per statement: short transactions beside the claims.
    batch_size: int = 500
    # Statements per pass at most; a backlog is worked off over several passes.
    max_batches_per_pass: int = 20

    def __post_init__(self) -> None:
        check_positive("pruner", retention_days=self.retention_days, interval=self.interval,
                       batch_size=self.batch_size,
                       max_batches_per_pass=self.max_batches_per_pass)


class Pruner(PeriodicLoop[int]):
    """Deletes completed and cancelled items past the retention, a small batch at a time."""

    name = "pruner"

    def __init__(self, pool: Pool, config: PrunerConfig) -> None:
        self.config = config
        super().__init__(config.interval)
        self._pool = pool

    async def run_once(self, now: datetime | None = None) -> int:
        """Delete what finished more than the retention before ``now`` (None: the database's
        clock); return how many items went."""
        deleted = 0
        for _ in range(self.config.max_batches_per_pass):
            async with self._pool.connection() as conn:
                batch = await queue.prune_finished_items(
                    conn, retention_days=self.config.retention_days,
                    limit=self.config.batch_size, now=now,
                )
            deleted += batch
            if batch < self.config.batch_size:
                break
        if deleted:
            self._log.info("items_pruned", deleted=deleted)
        return deleted
