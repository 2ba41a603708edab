"""The fleet-wide provider limiter against a real PostgreSQL: buckets that refill at 95 % of the
limit and hold two seconds of it, worst-case charges corrected afterwards, a shared cooldown, and
many connections taking from one key at once without ever granting more than it holds.
The clock is a parameter: every test passes its own ``now``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.rows import dict_row

from mf_worker.db import Connection
from mf_worker.flow import CONFIGURED_TTL_SECONDS, Limits, acquire, cool_down, correct, read_limits

T = TypeVar("T")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
KEY = "openai:http://127.0.0.1/v1#gpt-4o-mini"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(db_url: str, body: Callable[[Connection], Awaitable[T]]) -> T:
    async def main() -> T:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True,
                                                     row_factory=dict_row)
        async with conn:
            return await body(conn)

    return asyncio.run(main())


def test_a_new_key_grants_two_seconds_of_the_paced_rate_then_says_how_long_to_wait(
    db_url: str,
) -> None:
    # 600 a minute paced at 95 %: 9.5 a second, 19 in the bucket.
    limits = Limits(requests_per_minute=600)

    async def body(conn: Connection) -> list[Any]:
        grants = [await acquire(conn, KEY, limits=limits, now=T0) for _ in range(20)]
        later = await acquire(conn, KEY, limits=limits, now=at(1.0))
        return [grants, later]

    grants, later = run(db_url, body)
    assert [g.granted for g in grants] == [True] * 19 + [False]
    assert grants[-1].wait_seconds == pytest.approx(1 / 9.5)
    assert grants[18].request_level == pytest.approx(0.0)
    assert later.granted and later.request_level == pytest.approx(9.5 - 1)


def test_tokens_are_charged_at_the_worst_case_and_corrected_with_the_real_usage(
    db_url: str,
) -> None:
    # 60,000 tokens a minute: 950 a second paced, 1,900 held.
    limits = Limits(tokens_per_minute=60_000)

    async def body(conn: Connection) -> list[Any]:
        first = await acquire(conn, KEY, limits=limits, tokens=1_500, now=T0)
        refused = await acquire(conn, KEY, limits=limits, tokens=1_500, now=T0)
        await correct(conn, KEY, limits=limits, tokens=1_500 - 300, now=T0)  # used 300
        second = await acquire(conn, KEY, limits=limits, tokens=1_500, now=T0)
        return [first, refused, second]

    first, refused, second = run(db_url, body)
    assert first.granted and first.token_level == pytest.approx(400)
    assert not refused.granted and refused.wait_seconds == pytest.approx(1_100 / 950)
    assert second.granted and second.token_level == pytest.approx(1_600 - 1_500)


def test_a_call_bigger_than_the_bucket_needs_a_full_bucket_and_leaves_a_debt(db_url: str) -> None:
    limits = Limits(tokens_per_minute=60_000)  # holds 1,900

    async def body(conn: Connection) -> list[Any]:
        big = await acquire(conn, KEY, limits=limits, tokens=5_000, now=T0)
        small = await acquire(conn, KEY, limits=limits, tokens=100, now=at(1))
        return [big, small]

    big, small = run(db_url, body)
    assert big.granted and big.token_level == pytest.approx(1_900 - 5_000)
    # The debt of 3,100 plus 950 refilled: 2,150 short of 100, at 950 a second.
    assert not small.granted and small.wait_seconds == pytest.approx((100 + 2_150) / 950)


def test_a_cooldown_holds_every_call_until_the_providers_reset_then_restarts_empty(
    db_url: str,
) -> None:
    limits = Limits(requests_per_minute=600)

    async def body(conn: Connection) -> list[Any]:
        assert (await acquire(conn, KEY, limits=limits, now=T0)).granted
        hold = await cool_down(conn, KEY, seconds=30, reason="rate_limited", now=T0)
        again = await cool_down(conn, KEY, seconds=5, reason="rate_limited", now=at(1))
        during = await acquire(conn, KEY, limits=limits, now=at(10))
        states = await read_limits(conn, now=at(10))
        at_reset = await acquire(conn, KEY, limits=limits, now=at(30))
        after = await acquire(conn, KEY, limits=limits, now=at(31))
        return [hold, again, during, at_reset, after, states]

    hold, again, during, at_reset, after, states = run(db_url, body)
    assert hold.started and hold.until == at(30) and hold.reason == "rate_limited"
    assert not again.started and again.until == at(30)  # the later reset already set stays
    assert not during.granted and during.cooling_for == "rate_limited"
    assert during.wait_seconds == pytest.approx(20)
    assert not at_reset.granted and at_reset.cooling_for is None  # empty bucket: paced restart
    assert after.granted
    (state,) = states
    assert (state.cooldown_until, state.cooldown_reason) == (at(30), "rate_limited")
    assert state.rate_limited_count == 2


def test_an_exhausted_quota_pauses_the_key_once_and_outranks_a_rate_limit(db_url: str) -> None:
    limits = Limits()  # nothing configured: only cooldowns apply

    async def body(conn: Connection) -> list[Any]:
        free = [await acquire(conn, KEY, limits=limits, tokens=10**6, now=T0) for _ in range(50)]
        first = await cool_down(conn, KEY, seconds=600, reason="quota_exhausted", now=T0)
        second = await cool_down(conn, KEY, seconds=600, reason="quota_exhausted", now=at(1))
        limited = await cool_down(conn, KEY, seconds=2, reason="rate_limited", now=at(2))
        during = await acquire(conn, KEY, limits=limits, now=at(100))
        after = await acquire(conn, KEY, limits=limits, now=at(602))
        states = await read_limits(conn, now=at(700))
        return [free, first, second, limited, during, after, states]

    free, first, second, limited, during, after, states = run(db_url, body)
    assert all(g.granted for g in free)
    assert first.started and not second.started and second.until == at(601)
    assert limited.reason == "quota_exhausted" and not limited.started
    assert during.cooling_for == "quota_exhausted" and during.wait_seconds == pytest.approx(501)
    assert after.granted  # no limits configured: the pause ended, calls go again
    (state,) = states
    assert state.cooldown_until is None and state.quota_pauses == 1


@pytest.mark.parametrize("connections", [2, 6])
def test_connections_racing_for_one_key_are_granted_exactly_what_it_holds(
    db_url: str, connections: int,
) -> None:
    """Many connections take from one key at the same instant: the row lock serialises them, so
    exactly the bucket's 19 requests are granted however the statements interleave."""
    limits = Limits(requests_per_minute=600)

    async def racer(ready: asyncio.Event) -> list[bool]:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True,
                                                     row_factory=dict_row)
        async with conn:
            await conn.execute("SELECT 1")
            await ready.wait()
            return [(await acquire(conn, KEY, limits=limits, now=T0)).granted
                    for _ in range(15)]

    async def main() -> list[bool]:
        ready = asyncio.Event()
        tasks = [asyncio.create_task(racer(ready)) for _ in range(connections)]
        await asyncio.sleep(0.2)
        ready.set()
        return [g for part in await asyncio.gather(*tasks) for g in part]

    grants = asyncio.run(main())
    assert len(grants) == 15 * connections
    assert grants.count(True) == 19


def test_a_limit_the_provider_states_in_its_429_paces_a_fleet_that_configured_none(
    db_url: str,
) -> None:
    unknown = Limits()

    async def body(conn: Connection) -> list[Any]:
        before = [await acquire(conn, KEY, limits=unknown, now=T0) for _ in range(30)]
        await cool_down(conn, KEY, seconds=1, reason="rate_limited",
                        stated=Limits(requests_per_minute=120), now=T0)
        after = [await acquire(conn, KEY, limits=unknown, now=at(2)) for _ in range(4)]
        return [before, after]

    before, after = run(db_url, body)
    assert all(g.granted for g in before)  # nothing known: only 429s can hold the fleet
    # Learned: 120 a minute paced at 95 % = 1.9 a second, refilling from empty at the reset.
    assert [g.granted for g in after] == [True, False, False, False]
    assert after[1].wait_seconds == pytest.approx((1 - 0.9) / 1.9)


def test_a_configured_rate_paces_replicas_without_one_while_sent_and_lapses_when_none_does(
    db_url: str,
) -> None:
    """Replica A is configured at 60 a minute, replica B with nothing: B is paced at A's rate
    while A keeps sending it, and once no replica has sent it for CONFIGURED_TTL_SECONDS the
    rate is gone: B's calls go unpaced and status shows no configured rate."""
    configured, unknown = Limits(requests_per_minute=60), Limits()
    lapsed = CONFIGURED_TTL_SECONDS + 1

    async def body(conn: Connection) -> list[Any]:
        assert (await acquire(conn, KEY, limits=configured, now=T0)).granted
        paced = [await acquire(conn, KEY, limits=unknown, now=at(10)) for _ in range(5)]
        sent_late = await acquire(conn, KEY, limits=configured, now=at(lapsed - 10))
        still = [await acquire(conn, KEY, limits=unknown, now=at(lapsed)) for _ in range(5)]
        free = [await acquire(conn, KEY, limits=unknown, now=at(2 * lapsed)) for _ in range(30)]
        states = await read_limits(conn, now=at(2 * lapsed))
        return [paced, sent_late, still, free, states]

    paced, sent_late, still, free, states = run(db_url, body)
    # 60 a minute paced at 95 %: 0.95 a second, a bucket of 1.9: one call, then wait.
    assert [g.granted for g in paced] == [True, False, False, False, False]
    assert sent_late.granted
    assert [g.granted for g in still] == [True, False, False, False, False]  # sent again: fresh
    assert all(g.granted for g in free)  # nobody sent it for the TTL: no pace any more
    (state,) = states
    assert state.configured_requests_per_second is None
    assert state.requests_per_second is None


def test_each_429_stating_a_limit_replaces_the_learned_one(db_url: str) -> None:
    """A 429 stating 120 a minute, then one stating 600 (the limit raised), then one stating 60
    (lowered): after each reset the fleet paces at the latest stated limit, not the first."""
    unknown = Limits()

    async def learned_burst(conn: Connection, rpm: float, start: float) -> int:
        await cool_down(conn, KEY, seconds=1, reason="rate_limited",
                        stated=Limits(requests_per_minute=rpm), now=at(start))
        # 20 s after the reset the bucket is full: its size says the rate (2 s of it).
        grants = [await acquire(conn, KEY, limits=unknown, now=at(start + 21))
                  for _ in range(30)]
        return sum(g.granted for g in grants)

    async def body(conn: Connection) -> list[Any]:
        return [await learned_burst(conn, 120, 0), await learned_burst(conn, 600, 100),
                await learned_burst(conn, 60, 200), await read_limits(conn, now=at(300))]

    first, raised, lowered, states = run(db_url, body)
    assert (first, raised, lowered) == (3, 19, 1)  # 2 s of 1.9, 9.5 and 0.95 a second
    (state,) = states
    assert state.learned_requests_per_second == pytest.approx(60 * 0.95 / 60)
    assert state.learned_at == at(200)


def test_a_stated_limit_below_the_configured_one_wins(db_url: str) -> None:
    """Configured at 600 a minute, the provider's 429 says 120: the key paces at 120 (the
    smaller), although the replica keeps sending its 600."""
    configured = Limits(requests_per_minute=600)

    async def body(conn: Connection) -> list[Any]:
        assert (await acquire(conn, KEY, limits=configured, now=T0)).granted
        await cool_down(conn, KEY, seconds=1, reason="rate_limited",
                        stated=Limits(requests_per_minute=120), now=T0)
        return [await acquire(conn, KEY, limits=configured, now=at(21)) for _ in range(10)]

    grants = run(db_url, body)
    assert sum(g.granted for g in grants) == 3  # 2 s of 1.9 a second, not 19
