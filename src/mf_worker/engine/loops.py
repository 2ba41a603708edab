"""The shape every background loop shares: ``run_once(now)`` that tests call, ``run`` around it.

The heartbeat, reaper, scheduler and pruner each subclass :class:`PeriodicLoop`: one place that
handles the interval, the stop event and the rule that an error in one pass is logged and the
loop goes on (a database blip must not kill the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from typing import Any

from ..errors import describe_error
from ..logs import get_logger


class PeriodicLoop(ABC):
    """Runs :meth:`run_once` every ``interval`` seconds until :meth:`stop`."""

    name: str = "loop"

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"{self.name}: interval must be positive, got {interval}")
        self.interval = interval
        self._stopped = asyncio.Event()
        self._log = get_logger(f"mf_worker.{self.name}")

    @abstractmethod
    async def run_once(self) -> Any:
        """One pass; returns what it did (for tests and logs)."""

    async def tick(self) -> Any:
        """What ``run`` does every interval: one pass (a loop may pace itself across replicas)."""
        return await self.run_once()

    async def run(self) -> None:
        while not self._stopped.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad pass must not end the loop
                self._log.warning(f"{self.name}_pass_failed", error=describe_error(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=self.interval)

    def stop(self) -> None:
        """Ask the loop to end after the current pass (safe to call twice)."""
        self._stopped.set()
