"""The shape every background loop shares: a config, ``run_once(now)`` that tests call, and
``run`` around it until ``stop``.

Every maintenance loop (heartbeat, reaper, pruner, scheduler, budget, publisher) subclasses
:class:`PeriodicLoop`: one place that handles the interval, the stop event and the rule that an
error in one pass is logged and the loop goes on (a database blip must not kill the daemon). A
loop that knows when its next pass is needed (the publisher: the next delivery instant) says
so through :meth:`PeriodicLoop.next_delay`, and :meth:`PeriodicLoop.wake` runs a pass at once.
The LISTEN listener is not periodic, but has the same surface (:class:`Loop`), so the daemon
starts and stops all of them alike.

Time is an input: ``run_once(now)`` acts at ``now``; ``None`` means the loop's own notion of
the present, which for passes whose statements compare with stored instants is the database's
clock (one clock for every replica), and for the scheduler and the budget loop their injected
``clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from ..errors import describe_error
from ..logs import get_logger

R = TypeVar("R")


class Loop(Protocol):
    """What the daemon runs as a background task."""

    name: str

    async def run(self) -> None:
        """Repeat until :meth:`stop`."""

    def stop(self) -> None:
        """End after the current pass; safe to call twice."""


def check_positive(loop: str, **values: float) -> None:
    """Refuse a config whose named values are not positive (every interval and size is)."""
    for field, value in values.items():
        if not value > 0:
            raise ValueError(f"{loop}: {field} must be positive, got {value}")


class PeriodicLoop(ABC, Generic[R]):
    """Runs :meth:`run_once` every ``interval`` seconds until :meth:`stop`."""

    name: str = "loop"

    def __init__(self, interval: float) -> None:
        check_positive(self.name, interval=interval)
        self.interval = interval
        self._stopped = asyncio.Event()
        self._woken = asyncio.Event()
        self._log = get_logger(f"mf_worker.{self.name}")

    @abstractmethod
    async def run_once(self, now: datetime | None = None) -> R:
        """One pass at ``now``; returns what it did (for tests and logs)."""

    def next_delay(self, result: R) -> float:
        """Seconds to wait after a pass that returned ``result`` (default: the interval)."""
        return self.interval

    async def tick(self) -> R:
        """What ``run`` does every interval: one pass now (a loop may pace itself across
        replicas)."""
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
