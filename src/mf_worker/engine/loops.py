"""The shape every background loop shares: ``run_once(now)`` that tests call, ``run`` around it.

The heartbeat, reaper, scheduler, pruner and publisher each subclass :class:`PeriodicLoop`: one
place that handles the interval, the stop event and the rule that an error in one pass is logged
and the loop goes on (a database blip must not kill the daemon). A loop that knows when its next
pass is needed (the publisher: the next delivery instant) says so through :meth:`next_delay`,
and :meth:`wake` runs a pass at once.
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
        self._woken = asyncio.Event()
        self._log = get_logger(f"mf_worker.{self.name}")

    @abstractmethod
    async def run_once(self) -> Any:
        """One pass; returns what it did (for tests and logs)."""

    def next_delay(self, result: Any) -> float:
        """Seconds to wait after a pass that returned ``result`` (default: the interval)."""
        return self.interval

    async def tick(self) -> Any:
        """What ``run`` does every interval: one pass (a loop may pace itself across replicas)."""
        return await self.run_once()

    async def run(self) -> None:
        while not self._stopped.is_set():
            self._woken.clear()
            delay = self.interval
            try:
                delay = self.next_delay(await self.tick())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad pass must not end the loop
                self._log.warning(f"{self.name}_pass_failed", error=describe_error(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout=delay)

    def wake(self) -> None:
        """Run the next pass now instead of after the delay."""
        self._woken.set()

    def stop(self) -> None:
        """Ask the loop to end after the current pass (safe to call twice)."""
        self._stopped.set()
        self._woken.set()
