"""Waking idle workers within milliseconds: LISTEN on the queue's channel, with a health check.

The queue's trigger sends ``NOTIFY mf_worker_queue`` when an item becomes pending. A dedicated
connection (never a pooled one: LISTEN is session state) waits for notifications and sets the
worker's wake event. A listener that dies silently is a known failure of queue workers, so the
connection is pinged whenever it has been quiet for a while and re-established after any error
(:data:`RECONNECT`); polling goes on meanwhile, and the worker is woken after a reconnect in
case something was missed while deaf.

Not periodic, but the same shape as the other loops: ``run_once`` is one session on one
connection (until :meth:`Listener.stop`, or until the connection fails, which it raises),
``run`` repeats sessions with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

import psycopg

from ..backoff import Backoff
from ..db import connect
from ..errors import describe_error
from ..logs import get_logger
from ..settings import Settings
from .loop import check_positive

CHANNEL = "mf_worker_queue"
# Reconnecting after the connection failed n times in a row: 1, 2, 4 … s, at most 30 s.
RECONNECT = Backoff(initial=1.0, factor=2.0, cap=30.0)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """How the listening connection proves it is alive."""

    # Seconds without a notification after which the connection is pinged (SELECT 1).
    ping_interval: float = 15.0
    # Seconds a connection attempt, or a ping, may take before the session counts as failed.
    timeout: float = 10.0

    def __post_init__(self) -> None:
        check_positive("listener", ping_interval=self.ping_interval, timeout=self.timeout)


class Listener:
    """Sets ``wake`` on every queue notification until :meth:`stop`."""

    name = "listener"

    def __init__(self, settings: Settings, wake: asyncio.Event,
                 config: ListenerConfig | None = None) -> None:
        self.config = config or ListenerConfig()
        self._settings = settings
        self._wake = wake
        self._stopped = asyncio.Event()
        self._log = get_logger("mf_worker.listener")
        self.connected = asyncio.Event()
        self.reconnects = 0

    async def run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                await self.run_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                failures += 1
                delay = RECONNECT.delay(failures)
                self._log.warning("listener_lost", error=describe_error(exc), retry_in=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), timeout=delay)

    async def run_once(self, now: datetime | None = None) -> int:
        """One session: connect, LISTEN, and wake the worker on every notification until
        :meth:`stop`; returns how many notifications arrived. Raises when the connection
        fails (``run`` then reconnects). ``now`` is not used: a session is not a pass at an
        instant, and takes it only to have the shape of every loop."""
        received = 0
        conn = await connect(self._settings, connect_timeout=int(self.config.timeout))
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            if self.reconnects:
                self._log.info("listener_reconnected")
            self.reconnects += 1
            self.connected.set()
            self._wake.set()  # anything that arrived while we were deaf
            while not self._stopped.is_set():
                async for _ in conn.notifies(timeout=self.config.ping_interval):
                    received += 1
                    self._wake.set()
                    if self._stopped.is_set():
                        return received
                # Quiet for a while: prove the connection is alive rather than assume it.
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self.config.timeout)
        return received

    def stop(self) -> None:
        """End the session and the loop (safe to call twice)."""
        self._stopped.set()
