"""The promises no other test pinned down, each found by planting a bug the suite let through
(issue #29; `make mutants` plants them again, see tools/mutants.toml).

A claim passes over a row another transaction holds instead of waiting for it; a claim takes an
organisation's due item and leaves its item that is not due yet; an item's retry delay in SQL is
the rule of ``backoff.py`` (jittered, then capped at five minutes); every outcome other than
success is written acting for the item's organisation, so it works under the least-privilege
role, and that organisation ends with its transaction; a 429 holds even a key with no known
limits; the reaper reaps a lease just after it expires, never before, fails an item on its
MF_MAX_ATTEMPTS-th lost worker, and leaves alone an item whose heartbeat renewed its lease.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from mf_worker import flow, queue
from mf_worker.backoff import ITEM_RETRY
from mf_worker.db import as_org, open_pool
from mf_worker.engine.worker import Outcome
from mf_worker.maintenance.reaper import Reaper, ReaperConfig

from .conftest import settings_for
from .factories import make_episode, make_project, make_queue_item, make_tenant, one
from .workers import run_burst

Conn = psycopg.Connection[dict[str, Any]]
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


async def _connect(url: str) -> psycopg.AsyncConnection[dict[str, Any]]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)


# -- the claim ------------------------------------------------------------------------------------


def test_a_claim_passes_over_a_row_another_transaction_holds_instead_of_waiting(
    db_url: str, db: Conn
) -> None:
    """SKIP LOCKED: while a second connection holds the earliest due row's lock (another
    worker's claim in flight, an operator's open `SELECT … FOR UPDATE`), a claim returns the
    other due items at once. Without it the claim would queue behind the lock: here it would
    run into its lock timeout instead of returning."""
    t = make_tenant(db)
    items = [make_queue_item(db, make_project(db, t["user"]),
                             scheduled_for=NOW - timedelta(minutes=3 - n)) for n in range(3)]
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT id FROM episode_schedule_queue WHERE id = %s FOR UPDATE",
                       [items[0]["id"]])

        async def claim() -> list[queue.ClaimedItem]:
            async with await _connect(db_url) as conn:
                await conn.execute("SET lock_timeout = '500ms'")
                return await queue.claim_due_items(conn, worker="w1", limit=3,
                                                   lease_seconds=60, now=NOW)

        claimed = asyncio.run(claim())
        holder.rollback()
    assert sorted(i.id for i in claimed) == sorted(i["id"] for i in items[1:])


def test_a_claim_takes_an_organisations_due_item_and_leaves_its_later_one(
    db_url: str, db: Conn
) -> None:
    """One organisation with a due item and an item due in five seconds: the claim takes the
    first only (the organisation is among the due ones, so only the claim's own due condition
    keeps the later item back)."""
    t = make_tenant(db)
    due = make_queue_item(db, t["project"], scheduled_for=NOW - timedelta(seconds=5))
    make_queue_item(db, make_project(db, t["user"]), scheduled_for=NOW + timedelta(seconds=5))

    async def claim() -> list[queue.ClaimedItem]:
        async with await _connect(db_url) as conn:
            return await queue.claim_due_items(conn, worker="w1", limit=10, lease_seconds=60,
                                               now=NOW)

    assert [i.id for i in asyncio.run(claim())] == [due["id"]]


# -- the item backoff, in SQL ---------------------------------------------------------------------


def _defer_transient(db_url: str, db: Conn, *, retry_count: int, jitter: float) -> float:
    """Claim an item that failed transiently ``retry_count`` times before, fail it once more
    with the jitter draw ``jitter`` (far from any deadline); the delay ``defer_item`` chose,
    checked against the ``run_after`` it wrote."""
    t = make_tenant(db)
    row = make_queue_item(db, t["project"], scheduled_for=NOW - timedelta(minutes=1),
                          retry_count=retry_count)

    async def defer() -> float:
        async with await _connect(db_url) as conn:
            item = await queue.claim_item_by_id(conn, row["id"], worker="w1", lease_seconds=60,
                                                now=NOW)
            assert item is not None
            deferral = await queue.defer_item(
                conn, item, reason="transient", error="upstream 503",
                deadline_seconds=10.0**8, backoff=(ITEM_RETRY.initial, ITEM_RETRY.cap, jitter),
                now=NOW)
            assert deferral is not None and deferral.status == "pending"
            return deferral.delay_seconds

    delay = asyncio.run(defer())
    state = one(db, "SELECT run_after, retry_count FROM episode_schedule_queue WHERE id = %s",
                row["id"])
    assert state["retry_count"] == retry_count + 1
    assert (state["run_after"] - NOW).total_seconds() == pytest.approx(delay, abs=1e-6)
    return delay


@pytest.mark.parametrize("retry_count", [0, 3, 7, 8, 9, 25])
def test_an_items_retry_delay_is_the_backoff_rule_with_the_callers_jitter_draw(
    db_url: str, db: Conn, retry_count: int
) -> None:
    """`defer_item` computes the delay under the row lock from the item's retry_count, with
    one jitter draw from the caller: the same delay as ``ITEM_RETRY.delay`` for the same
    draw — the smallest and the largest jitter, and a random one."""
    seed = random.Random(retry_count).randrange(10**6)
    draws = [1 - ITEM_RETRY.jitter, 1 + ITEM_RETRY.jitter,
             ITEM_RETRY.jitter_factor(random.Random(seed))]
    expected = [ITEM_RETRY.base(retry_count + 1) * d for d in draws[:2]]
    expected.append(ITEM_RETRY.delay(retry_count + 1, rng=random.Random(seed)))
    got = [_defer_transient(db_url, db, retry_count=retry_count, jitter=d) for d in draws]
    assert got == pytest.approx([min(e, ITEM_RETRY.cap) for e in expected], abs=1e-9)


def test_the_jittered_retry_delay_never_exceeds_the_five_minute_cap(
    db_url: str, db: Conn
) -> None:
    """Five minutes is the cap, jitter included (backoff.py, the README): the largest jitter
    draw after 8, 9 or 30 failures waits 300 s, not 307 or 360 — and the smallest still
    spreads such retries below the cap (240 s), so items that failed together do not all
    come back together."""
    high = [_defer_transient(db_url, db, retry_count=n, jitter=1.2) for n in (8, 9, 30)]
    assert high == [300.0, 300.0, 300.0]
    assert _defer_transient(db_url, db, retry_count=30, jitter=0.8) == pytest.approx(240.0)


def test_items_failing_together_come_back_at_different_times(db_url: str, db: Conn) -> None:
    """Through the worker: five items fail transiently in one burst, and each gets its own
    jitter draw, so their one-second delays differ (a delay without jitter would be 1.0 for
    every one of them)."""
    items = [make_queue_item(db, make_tenant(db, title="fail-always")["project"])
             for _ in range(5)]
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.RETRY] * 5
    delays = []
    for item in items:
        state = one(db, "SELECT run_after, updated_at FROM episode_schedule_queue"
                    " WHERE id = %s", item["id"])
        delays.append((state["run_after"] - state["updated_at"]).total_seconds())
    assert all(0.8 <= d <= 1.2 for d in delays), delays
    assert len(set(delays)) == 5, delays


# -- acting for the organisation ------------------------------------------------------------------


def test_failures_deferrals_and_cancels_are_written_for_their_organisation_under_rls(
    worker_role_url: str, db: Conn
) -> None:
    """As the documented least-privilege role (row-level security applies): a permanent
    failure, a transient failure and a cancel each reach the episode's history, which only a
    transaction acting for the item's organisation can see."""
    permanent = make_tenant(db, title="permanent")
    permanent_item = make_queue_item(db, permanent["project"])
    transient = make_tenant(db, title="fail-always")
    transient_item = make_queue_item(db, transient["project"])
    paused = make_tenant(db)
    started = make_episode(db, paused["project"], status="generating")
    paused_item = make_queue_item(db, paused["project"], episode_id=started["id"],
                                  attempt_count=1)
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [paused["project"]["id"]])

    reports = run_burst(worker_role_url)
    assert sorted(r.outcome.value for r in reports) == ["cancelled", "failed", "retry"]

    def episode_of(item: dict[str, Any]) -> dict[str, Any]:
        return one(db, "SELECT e.status, e.generation_attempts, e.generation_errors"
                   " FROM episodes e JOIN episode_schedule_queue q ON q.episode_id = e.id"
                   " WHERE q.id = %s", item["id"])

    assert episode_of(permanent_item) == {
        "status": "failed", "generation_attempts": 1,
        "generation_errors": ["attempt 1: 400 Bad Request: content refused"]}
    assert episode_of(transient_item) == {
        "status": "generating", "generation_attempts": 1,
        "generation_errors": ["attempt 1: upstream 503 on attempt 1"]}
    cancelled = episode_of(paused_item)
    assert cancelled["status"] == "failed"
    assert cancelled["generation_errors"][-1].startswith("cancelled: ")
    assert one(db, "SELECT status FROM episode_schedule_queue WHERE id = %s",
               paused_item["id"])["status"] == "cancelled"


def test_acting_for_an_organisation_ends_with_its_transaction(
    worker_role_url: str, db: Conn
) -> None:
    """The organisation a transaction acts for is a transaction-local setting: the next
    transaction on the same (pooled) connection sees no organisation's rows until it acts for
    one itself, so a connection never carries one organisation's access into another's work."""
    t = make_tenant(db)
    make_episode(db, t["project"])

    async def main() -> tuple[int, int]:
        async with await _connect(worker_role_url) as conn:
            async with as_org(conn, t["org"]["id"]):
                inside = await (await conn.execute("SELECT count(*) AS n FROM episodes")
                                ).fetchone()
            after = await (await conn.execute("SELECT count(*) AS n FROM episodes")).fetchone()
            assert inside is not None and after is not None
            return inside["n"], after["n"]

    assert asyncio.run(main()) == (1, 0)


# -- flow control ---------------------------------------------------------------------------------


def test_a_429_holds_a_key_with_no_known_limits_until_its_reset(db_url: str) -> None:
    """A fleet that configured no limits and got a 429 that stated none: no bucket holds its
    calls, only the key's cooldown does — every call waits for the provider's reset."""
    t0 = NOW
    nothing = flow.Limits()

    async def main() -> list[flow.Grant]:
        async with await _connect(db_url) as conn:
            assert (await flow.acquire(conn, "k", limits=nothing, now=t0)).granted
            await flow.cool_down(conn, "k", seconds=30, reason="rate_limited", now=t0)
            return [await flow.acquire(conn, "k", limits=nothing, now=t0 + timedelta(seconds=s))
                    for s in (10, 29, 31)]

    during, late, after = asyncio.run(main())
    assert (during.granted, during.cooling_for) == (False, "rate_limited")
    assert during.wait_seconds == pytest.approx(20)
    assert not late.granted
    assert after.granted


# -- the reaper -----------------------------------------------------------------------------------


def _claim_one(db_url: str, db: Conn, project: dict[str, Any] | None = None, **item_kw: Any
               ) -> queue.ClaimedItem:
    """One due item (of ``project``, else a new tenant's) claimed at NOW with a 60 s lease."""
    project = project or make_tenant(db)["project"]
    row = make_queue_item(db, project, scheduled_for=NOW - timedelta(minutes=1), **item_kw)

    async def claim() -> queue.ClaimedItem | None:
        async with await _connect(db_url) as conn:
            return await queue.claim_item_by_id(conn, row["id"], worker="ghost",
                                                lease_seconds=60, now=NOW)

    item = asyncio.run(claim())
    assert item is not None and item.lease_expires_at == NOW + timedelta(seconds=60)
    return item


def _reap_at(url: str, now: datetime) -> list[queue.ReapedItem]:
    async def reap() -> list[queue.ReapedItem]:
        pool = await open_pool(settings_for(url), max_size=2)
        try:
            return await Reaper(pool, ReaperConfig(lease_seconds=60, max_attempts=3)
                                ).run_once(now)
        finally:
            await pool.close()

    return asyncio.run(reap())


def test_the_reaper_reaps_a_lease_just_after_it_expires_and_not_just_before(
    db_url: str, db: Conn
) -> None:
    """A worker that is merely slow keeps its item until the last instant of its lease; one
    millisecond later the item goes back to pending."""
    item = _claim_one(db_url, db)
    expiry = item.lease_expires_at
    assert _reap_at(db_url, expiry - timedelta(milliseconds=1)) == []
    assert _reap_at(db_url, expiry) == []
    assert one(db, "SELECT status, claim_token FROM episode_schedule_queue WHERE id = %s",
               item.id) == {"status": "processing", "claim_token": item.token}
    reaped = _reap_at(db_url, expiry + timedelta(milliseconds=1))
    assert [(r.id, r.status) for r in reaped] == [(item.id, "pending")]


@pytest.mark.parametrize(("lost_before", "status"),
                         [(0, "pending"), (1, "pending"), (2, "failed")])
def test_a_reaped_item_fails_on_its_max_attempts_th_lost_worker_and_not_before(
    db_url: str, db: Conn, lost_before: int, status: str
) -> None:
    """MF_MAX_ATTEMPTS 3: the first and the second lost worker put the item back; the third
    fails it (counted by lost_count, apart from the transient failures' attempts)."""
    item = _claim_one(db_url, db, lost_count=lost_before, attempt_count=5)
    reaped = _reap_at(db_url, item.lease_expires_at + timedelta(seconds=1))
    assert [(r.id, r.status) for r in reaped] == [(item.id, status)]
    assert one(db, "SELECT lost_count FROM episode_schedule_queue WHERE id = %s",
               item.id)["lost_count"] == lost_before + 1


def test_a_heartbeat_keeps_a_slow_workers_item_from_the_reaper(db_url: str, db: Conn) -> None:
    """Ten seconds before its lease runs out, the heartbeat renews it for another lease from
    then: the reaper leaves the item alone past the first expiry, and reaps it only after the
    renewed one (the worker stopped beating)."""
    item = _claim_one(db_url, db)
    beat_at = item.lease_expires_at - timedelta(seconds=10)

    async def beat() -> queue.LeaseRenewal:
        async with await _connect(db_url) as conn:
            return await queue.extend_leases(conn, [item], lease_seconds=60, now=beat_at)

    assert asyncio.run(beat()).renewed == {item.token}
    renewed = beat_at + timedelta(seconds=60)
    assert _reap_at(db_url, item.lease_expires_at + timedelta(seconds=1)) == []
    assert _reap_at(db_url, renewed - timedelta(milliseconds=1)) == []
    assert [r.id for r in _reap_at(db_url, renewed + timedelta(milliseconds=1))] == [item.id]


def test_the_reaper_records_a_lost_attempt_for_its_organisation_under_rls(
    worker_role_url: str, db_url: str, db: Conn
) -> None:
    """As the least-privilege role, the reaper's verdict reaches the episode's history (which
    only a transaction acting for the organisation can write)."""
    t = make_tenant(db)
    episode = make_episode(db, t["project"], status="generating")
    item = _claim_one(db_url, db, t["project"], episode_id=episode["id"])
    reaped = _reap_at(worker_role_url, item.lease_expires_at + timedelta(seconds=1))
    assert [r.id for r in reaped] == [item.id]
    errors = one(db, "SELECT generation_errors FROM episodes WHERE id = %s",
                 episode["id"])["generation_errors"]
    assert len(errors) == 1 and errors[0].startswith("attempt 1: worker lost: ghost")
