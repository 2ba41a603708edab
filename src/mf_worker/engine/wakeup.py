"""Waking idle workers within milliseconds: LISTEN on the queue's channel, with a health check.

The queue's trigger sends ``NOTIFY mf_worker_queue`` when an item becomes pending. A dedicated
connection (never a pooled one: LISTEN is session state) waits for notifications and sets the
worker's wake event. A listener that dies silently is a known failure of queue workers, so the
connection is pinged whenever it has been quiet for a while and re-established after any error;
polling goes on meanwhile, and the worker is woken after a reconnect in case something was
missed while deaf.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from ..backoff import Backoff
from ..db import connect
from ..errors import describe_error
from ..logs import get_logger
from ..settings import Settings

CHANNEL = "mf_worker_queue"
# Reconnecting after the connection failed n times in a row: 1, 2, 4 … s, at most 30 s.
RECONNECT = Backoff(initial=1.0, factor=2.0, cap=30.0)


class Listener:
    """Sets ``wake`` on every queue notification until :meth:`stop`."""

    def __init__(self, settings: Settings, wake: asyncio.Event, *, ping_interval: float = 15.0):
        self._settings = settings
        self._wake = wake
        self._ping_interval = ping_interval
        self._stopped = asyncio.Event()
        self._log = get_logger("mf_worker.listener")
        self.connected = asyncio.Event()
        self.reconnects = 0

    async def run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                await self._listen()
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

    async def _listen(self) -> None:
        conn = await connect(self._settings, connect_timeout=10)
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            if self.reconnects:
                self._log.info("listener_reconnected")
            self.reconnects += 1
            self.connected.set()
            self._wake.set()  # anything that arrived while we were deaf
            while not self._stopped.is_set():
                async for _ in conn.notifies(timeout=self._ping_interval):
                    self._wake.set()
                    if self._stopped.is_set():
                        return
                # Quiet for a while: prove the connection is alive rather than assume it.
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=10)

    def stop(self) -> None:
        self._stopped.set()
