"""The fleet-wide provider limiter: token buckets per limit key, kept in PostgreSQL.

Every LLM provider limits requests and tokens per minute per account. Workers on many hosts
share those limits through one row per limit key in ``provider_limits``: before a call a worker
`acquire`s one request and the call's worst-case tokens (the cost reservation's estimate) in one
statement that locks the row, so any number of processes take from the same budget exactly.
The buckets refill continuously at `PACE` (95 %) of the configured limits and hold only
`BURST_SECONDS` of them: a client paced at exactly the limit still draws rejections from a
provider that measures over shorter windows, one paced a little under it draws none. After the
call, `correct` gives back what the real usage did not need.

Rates come from two places and are kept apart in the key's row. A replica with configured limits
(``MF_LLM_REQUESTS_PER_MINUTE``, ``MF_LLM_TOKENS_PER_MINUTE``) paces at them and stores them
with the time at every take; replicas without any use the stored ones while they are fresh, and
they lapse `CONFIGURED_TTL_SECONDS` after the last replica sent them (a rate removed from the
settings stops pacing the fleet). A 429 that states the provider's limits
(``x-ratelimit-limit-*``) replaces the learned rate of each dimension it states. Where both are
known, the smaller applies.

A 429 calls `cool_down`: every worker's new calls under the key wait until the provider's reset,
and the buckets restart empty from then on. An exhausted quota does the same for
`QUOTA_PAUSE_SECONDS` (then one round of calls probes whether it was topped up). Both work with
no limits configured at all: then only the cooldown applies.

Time is an input: each function takes ``now`` (None = the database's clock, which every host
shares; tests pass their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from ..db import Connection
from ..db.sql import load_queries

__all__ = [
    "BURST_SECONDS",
    "CONFIGURED_TTL_SECONDS",
    "PACE",
    "CoolDown",
    "Grant",
    "KeyState",
    "Limits",
    "acquire",
    "cool_down",
    "correct",
    "read_limits",
    "reset_limit",
]

_Q = load_queries(__package__ or "mf_worker.flow", "limiter.sql")

PACE: Final = 0.95
"""Share of the configured limit the fleet paces itself at."""
BURST_SECONDS: Final = 2.0
"""Seconds of the paced rate a bucket holds: the most the fleet sends at once after a pause."""
CONFIGURED_TTL_SECONDS: Final = 300.0
"""How long a configured rate stored by one replica paces the replicas that have none after it
was last sent (every take of a replica with configured limits sends them). An idle worker takes
about once per poll interval, a busy one at every call; five minutes covers long generations
that fill a replica's window."""

CoolDownReason = Literal["rate_limited", "quota_exhausted"]


@dataclass(frozen=True, slots=True)
class Limits:
    """A provider's limits for one key, per minute; None = not known (no bucket on it)."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    @property
    def requests_per_second(self) -> float | None:
        return _paced(self.requests_per_minute)

    @property
    def tokens_per_second(self) -> float | None:
        return _paced(self.tokens_per_minute)


def _paced(per_minute: float | None) -> float | None:
    return None if per_minute is None or per_minute <= 0 else per_minute * PACE / 60.0


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer of `acquire`: granted, or how long until it would be and why."""

    wait_seconds: float  # 0 when granted
    cooling_for: CoolDownReason | None  # set when the key is in a cooldown
    request_level: float | None  # the buckets after this take (None: no bucket)
    token_level: float | None

    @property
    def granted(self) -> bool:
        return self.wait_seconds <= 0


@dataclass(frozen=True, slots=True)
class CoolDown:
    """The answer of `cool_down`: whether this call began the hold, and until when."""

    started: bool
    until: datetime
    reason: CoolDownReason


@dataclass(frozen=True, slots=True)
class KeyState:
    """One key as `mf-worker status` and the metrics show it."""

    limit_key: str
    requests_per_second: float | None
    tokens_per_second: float | None
    request_level: float | None
    token_level: float | None
    cooldown_until: datetime | None
    cooldown_reason: CoolDownReason | None
    rate_limited_count: int
    quota_pauses: int
    # Where the rates come from: configured by a replica within CONFIGURED_TTL_SECONDS (None
    # when none sent one), and learned from the provider's last 429 that stated them.
    configured_requests_per_second: float | None = None
    configured_tokens_per_second: float | None = None
    configured_at: datetime | None = None
    learned_requests_per_second: float | None = None
    learned_tokens_per_second: float | None = None
    learned_at: datetime | None = None


def _params(key: str, limits: Limits, now: datetime | None) -> dict[str, Any]:
    # A bucket holds BURST_SECONDS of its rate, and at least one whole request (or token), so
    # a tiny limit still admits a call at a time.
    return {"key": key, "now": now, "rps": limits.requests_per_second,
            "tps": limits.tokens_per_second, "burst": BURST_SECONDS,
            "ttl": CONFIGURED_TTL_SECONDS}


async def acquire(
    conn: Connection, key: str, *, limits: Limits, requests: int = 1, tokens: int = 0,
    now: datetime | None = None,
) -> Grant:
    """Take ``requests`` and ``tokens`` from ``key``'s buckets in one statement, or say how
    long to wait (nothing is taken then). ``conn`` must be in autocommit mode."""
    params = {**_params(key, limits, now), "requests": requests, "tokens": tokens}
    for _ in range(2):
        cur = await conn.execute(_Q["acquire"], params)
        row = await cur.fetchone()
        if row is not None:
            return Grant(wait_seconds=float(row["wait_seconds"]),
                         cooling_for=row["cooling_for"] if not row["granted"] else None,
                         request_level=row["request_level"], token_level=row["token_level"])
        # First use of the key (or an operator deleted its row): create it full, then take.
        await conn.execute(_Q["ensure_limit"], {"key": key, "now": now})
    raise AssertionError(f"provider_limits row for {key!r} vanished twice")  # pragma: no cover


async def correct(
    conn: Connection, key: str, *, limits: Limits, requests: int = 0, tokens: int = 0,
    now: datetime | None = None,
) -> None:
    """Give back ``requests``/``tokens`` charged but not used (negative: take what was used
    beyond the charge); a bucket never fills above its capacity."""
    if requests == 0 and tokens == 0:
        return
    await conn.execute(
        _Q["correct"], {**_params(key, limits, now), "requests": requests, "tokens": tokens})


async def cool_down(
    conn: Connection, key: str, *, seconds: float, reason: CoolDownReason,
    stated: Limits | None = None, now: datetime | None = None,
) -> CoolDown:
    """Hold every worker's new calls under ``key`` for ``seconds`` (a longer hold already set
    stays), and restart its buckets empty when the hold ends. ``stated`` is what the provider
    said its limits are (``x-ratelimit-limit-*``): each limit it states replaces the key's learned
    rate of that dimension."""
    if reason not in ("rate_limited", "quota_exhausted"):
        raise ValueError(f"cool_down: unknown reason {reason!r}")
    stated = stated or Limits()
    params = {"key": key, "now": now, "seconds": max(seconds, 0.0), "reason": reason,
              "learned_rps": stated.requests_per_second,
              "learned_tps": stated.tokens_per_second, "ttl": CONFIGURED_TTL_SECONDS}
    for _ in range(2):
        cur = await conn.execute(_Q["cool_down"], params)
        row = await cur.fetchone()
        if row is not None:
            return CoolDown(started=bool(row["started"]), until=row["cooldown_until"],
                            reason=row["cooldown_reason"])
        await conn.execute(_Q["ensure_limit"], {"key": key, "now": now})
    raise AssertionError(f"provider_limits row for {key!r} vanished twice")  # pragma: no cover


async def read_limits(conn: Connection, *, now: datetime | None = None) -> list[KeyState]:
    """Every limit key's state (cooldowns that have ended read as none)."""
    cur = await conn.execute(_Q["read_limits"], {"now": now, "ttl": CONFIGURED_TTL_SECONDS})
    return [
        KeyState(limit_key=r["limit_key"], requests_per_second=r["requests_per_second"],
                 tokens_per_second=r["tokens_per_second"], request_level=r["request_level"],
                 token_level=r["token_level"], cooldown_until=r["cooldown_until"],
                 cooldown_reason=r["cooldown_reason"],
                 rate_limited_count=r["rate_limited_count"], quota_pauses=r["quota_pauses"],
                 configured_requests_per_second=r["configured_requests_per_second"],
                 configured_tokens_per_second=r["configured_tokens_per_second"],
                 configured_at=r["configured_at"],
                 learned_requests_per_second=r["learned_requests_per_second"],
                 learned_tokens_per_second=r["learned_tokens_per_second"],
                 learned_at=r["learned_at"])
        for r in await cur.fetchall()
    ]


async def reset_limit(conn: Connection, key: str, *,
                      now: datetime | None = None) -> dict[str, Any] | None:
    """An operator's reset of ``key``: no cooldown, full buckets, no learnt rates. Returns the
    cooldown it ended (``old_cooldown_reason``, ``old_cooldown_until``; both None if none), or
    None when there is no such key."""
    cur = await conn.execute(_Q["reset_limit"], {"key": key, "now": now})
    row = await cur.fetchone()
    return None if row is None else dict(row)
