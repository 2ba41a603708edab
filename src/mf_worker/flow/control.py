"""One process's flow control at the provider: what the claim loop may take, and what a
generator call must wait for.

`FlowControl` sits between the worker and the fleet-wide limiter (``limiter.py``). For a
generator that names its limit key (`mf_worker.generation.limit_key_of`), before each claim the
claim loop asks `admit` how many items it may claim: one request is taken from the key's bucket
per item (so the fleet claims only what the provider's budget admits, and sleeps until the
refill otherwise), capped by an adaptive in-flight window per key; the window's use is the
count of items the process holds, passed in by the worker, so nothing here can drift from it.
Before its first call the item takes its worst-case tokens (`take_tokens`); every further call
of the attempt (a repair) takes one more request and its own tokens (`take_tokens` with
``requests=1``, through the request's call ledger), so the request bucket counts HTTP calls,
not items. Afterwards the tokens are corrected with the real usage (`succeeded`), a 429 halves
the window and sets the shared cooldown (`rate_limited`), and an exhausted quota pauses the key
(`quota_exhausted`), whose first observer since calls last succeeded notifies
(`claim_quota_notice`; an answered call clears it: `quota_recovered`). A generator without a
limit key passes straight through: no statement, no wait.

The window starts small (`INITIAL_WINDOW`) and grows by one per success, like a slow start,
until the first 429; it then halves (at most once per cooldown) and grows by 1/window per
success. With limits configured (or learned from a 429's headers) the buckets do the pacing and
the window rarely binds; with nothing known, the cooldown and the window keep 429s rare.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..db import Pool
from ..db.sql import load_queries
from ..errors import MfWorkerError
from . import limiter
from .limiter import CoolDown, Limits

_Q = load_queries(__package__ or "mf_worker.flow", "control.sql")

__all__ = ["INITIAL_WINDOW", "FlowControl", "FlowEvent", "KeyCoolingDown"]

INITIAL_WINDOW: Final = 4
MAX_TOKEN_WAIT_SECONDS: Final = 30.0  # one sleep's most; the loop re-asks after it


class KeyCoolingDown(MfWorkerError):
    """The limit key is held for longer than an item should wait holding its claim (an
    exhausted quota, a long reset): the item goes back to the queue without calling."""

    def __init__(self, reason: str, seconds: float) -> None:
        super().__init__(f"calls to the provider are paused for {seconds:.0f} s ({reason})")
        self.reason = reason
        self.seconds = seconds


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """What flow control did, for the metrics: ``kind`` is ``wait`` (``seconds`` spent waiting
    on the limiter), ``rate_limited``, ``cooldown`` (``reason``) or ``window`` (``value``)."""

    kind: str
    key: str
    seconds: float = 0.0
    reason: str | None = None
    value: float = 0.0


class FlowControl:
    """Admission and feedback for one process's calls under one limit key (or none)."""

    def __init__(self, pool: Pool, key: str | None, limits: Limits, *, concurrency: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.key = key
        self.limits = limits
        self.concurrency = concurrency
        self.window = float(min(INITIAL_WINDOW, concurrency))
        self._slow_start = True
        # Whether an exhausted quota may still be on record for the key (the notice that
        # stops a second notification): cleared by this process's first answered call after
        # it starts or after it saw the quota exhausted, so most successes cost no statement.
        self._quota_noticed = True
        self._halved_at = -math.inf
        self._monotonic = monotonic
        self.listeners: list[Callable[[FlowEvent], None]] = []

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def _emit(self, event: FlowEvent) -> None:
        for listener in self.listeners:
            listener(event)

    # -- admission -----------------------------------------------------------------------------

    async def admit(self, wanted: int, *, in_use: int) -> tuple[int, float | None]:
        """How many of ``wanted`` items the claim loop may claim now (their requests are
        taken), and if fewer, how long to sleep before asking again (None: until a slot of the
        window frees). ``in_use``: the items this process holds under the key now (the
        worker's own count, so a failed claim cannot leave slots taken)."""
        if self.key is None:
            return wanted, None
        room = min(wanted, math.floor(self.window) - in_use)
        if room <= 0:
            return 0, None
        granted, wait = 0, None
        async with self.pool.connection() as conn:
            for _ in range(room):
                grant = await limiter.acquire(conn, self.key, limits=self.limits, requests=1)
                if not grant.granted:
                    wait = grant.wait_seconds
                    break
                granted += 1
        if wait is not None and granted == 0:
            self._emit(FlowEvent("wait", self.key, seconds=wait))
        return granted, wait

    async def unused(self, count: int) -> None:
        """The claim failed or found fewer items than admitted, or items ended before their
        call: give their requests back to the key's bucket."""
        if self.key is None or count <= 0:
            return
        async with self.pool.connection() as conn:
            await limiter.correct(conn, self.key, limits=self.limits, requests=count)

    async def take_tokens(self, tokens: int, *, requests: int = 0) -> float:
        """Before a call: take its worst-case tokens (and ``requests``: 1 for a call the claim
        did not admit, such as a repair), sleeping until the buckets hold them. Returns the
        seconds waited. Raises `KeyCoolingDown` when the key is held for longer than
        `MAX_TOKEN_WAIT_SECONDS` (the item should go back to the queue instead)."""
        if self.key is None or (tokens <= 0 and requests <= 0):
            return 0.0
        waited = 0.0
        while True:
            async with self.pool.connection() as conn:
                grant = await limiter.acquire(conn, self.key, limits=self.limits,
                                              requests=requests, tokens=max(tokens, 0))
            if grant.granted:
                if waited:
                    self._emit(FlowEvent("wait", self.key, seconds=waited))
                return waited
            if grant.cooling_for is not None and grant.wait_seconds > MAX_TOKEN_WAIT_SECONDS:
                raise KeyCoolingDown(grant.cooling_for, grant.wait_seconds)
            pause = min(grant.wait_seconds, MAX_TOKEN_WAIT_SECONDS)
            waited += pause
            await asyncio.sleep(pause)

    # -- feedback ------------------------------------------------------------------------------

    async def succeeded(self, charged_tokens: int, used_tokens: int) -> None:
        """The call went through: grow the window, give back the tokens it did not use."""
        if self.key is None:
            return
        grow = 1.0 if self._slow_start else 1.0 / max(self.window, 1.0)
        self.window = min(float(self.concurrency), self.window + grow)
        if charged_tokens and charged_tokens != used_tokens:
            async with self.pool.connection() as conn:
                await limiter.correct(conn, self.key, limits=self.limits,
                                      tokens=charged_tokens - used_tokens)

    async def rate_limited(self, retry_after: float, stated: Limits) -> CoolDown | None:
        """A 429: hold the fleet's calls under the key until the provider's reset, and halve
        this process's window (once per cooldown, so a burst of 429s halves it once)."""
        if self.key is None:
            return None
        now = self._monotonic()
        self._slow_start = False
        if now - self._halved_at >= retry_after:
            self.window = max(1.0, self.window / 2)
            self._halved_at = now
            self._emit(FlowEvent("window", self.key, value=self.window))
        self._emit(FlowEvent("rate_limited", self.key))
        async with self.pool.connection() as conn:
            hold = await limiter.cool_down(conn, self.key, seconds=retry_after,
                                           reason="rate_limited", stated=stated)
        if hold.started:
            self._emit(FlowEvent("cooldown", self.key, seconds=retry_after,
                                 reason="rate_limited"))
        return hold

    async def quota_exhausted(self, pause: float) -> CoolDown | None:
        """An exhausted quota: pause the key fleet-wide; ``started`` tells the first to see it."""
        if self.key is None:
            return None
        self.window = 1.0
        self._slow_start = False
        async with self.pool.connection() as conn:
            hold = await limiter.cool_down(conn, self.key, seconds=pause,
                                           reason="quota_exhausted")
        if hold.started:
            self._emit(FlowEvent("cooldown", self.key, seconds=pause, reason="quota_exhausted"))
        return hold

    async def claim_quota_notice(self) -> bool:
        """Whether this process is the one to tell the operator about the key's exhausted
        quota: True once per exhaustion, fleet-wide (the first to ask since calls under the key
        last succeeded); later pauses of the same exhaustion stay quiet."""
        if self.key is None:
            return False
        self._quota_noticed = True
        async with self.pool.connection() as conn:
            cur = await conn.execute(_Q["claim_quota_notice"], {"key": self.key})
            return await cur.fetchone() is not None

    async def held(self) -> tuple[str, float] | None:
        """Whether the key is held fleet-wide now: its reason (``rate_limited``,
        ``quota_exhausted``) and the seconds left, or None (also for no key). One read, no
        call: the fallback decision asks it instead of probing a held provider."""
        if self.key is None:
            return None
        async with self.pool.connection() as conn:
            cur = await conn.execute(_Q["read_key_hold"], {"key": self.key})
            row = await cur.fetchone()
        return None if row is None else (str(row["reason"]), float(row["seconds"]))

    async def quota_recovered(self) -> None:
        """A call under the key was answered: the quota works again, so the next exhaustion is
        a new one and is notified. Costs a statement only after this process started or saw
        the quota exhausted."""
        if self.key is None or not self._quota_noticed:
            return
        async with self.pool.connection() as conn:
            await conn.execute(_Q["clear_quota_notice"], {"key": self.key})
        self._quota_noticed = False
