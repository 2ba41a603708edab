"""On-time delivery (issue #15): generate within a lead window, publish at the delivery instant.

Everything runs on real PostgreSQL with the real worker, scheduler, budget loop and publisher.
Time is an input: delivery instants are put in the future or the past relative to the database's
clock, and the publisher's pass is given the instant as ``now``; nothing sleeps until a real
09:00.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from mf_worker import queue
from mf_worker.cost.budget import BudgetLoop
from mf_worker.db import connect, open_pool
from mf_worker.scheduling.cadence import next_occurrence
from mf_worker.scheduling.scheduler import Scheduler, enqueue_item

from .conftest import settings_for
from .factories import make_queue_item, make_tenant
from .workers import run_burst

Conn = psycopg.Connection[dict[str, Any]]
LEAD = timedelta(minutes=15)


def one(conn: Conn, sql: str, *params: Any) -> dict[str, Any]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return row


def scheduler_pass(db_url: str, now: datetime, lead_seconds: float = 900.0) -> None:
    async def main() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            await Scheduler(pool, 1.0, lead_seconds=lead_seconds).run_once(now=now)
        finally:
            await pool.close()

    asyncio.run(main())


# -- the lead window ---------------------------------------------------------------------------


def test_scheduler_makes_items_claimable_a_lead_window_before_their_delivery_instant(
    db_url: str, db: Conn
) -> None:
    """scheduled_for stays the delivery instant (09:00 London, in UTC); run_after is 15 min
    earlier. A re-planned item (the project moved its delivery time) keeps the lead too."""
    t = make_tenant(db, cadence={"mode": "daily"})
    now = datetime(2026, 3, 4, 12, 30, tzinfo=UTC)
    scheduler_pass(db_url, now)
    item = one(db, "SELECT * FROM episode_schedule_queue WHERE project_id = %s",
               t["project"]["id"])
    due = next_occurrence({"mode": "daily"}, t["project"]["delivery_time"], "Europe/London", now)
    assert item["scheduled_for"] == due
    assert item["run_after"] == due - LEAD

    db.execute("UPDATE projects SET delivery_time = '07:30' WHERE id = %s", [t["project"]["id"]])
    scheduler_pass(db_url, now)
    moved = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert moved["scheduled_for"] == due - timedelta(hours=1, minutes=30)
    assert moved["run_after"] == moved["scheduled_for"] - LEAD


def test_final_write_plans_the_next_item_a_lead_window_early(db_url: str, db: Conn) -> None:
    t = make_tenant(db, cadence={"mode": "daily"})
    make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))
    run_burst(db_url, lead_seconds=600)
    nxt = one(db, "SELECT * FROM episode_schedule_queue WHERE status = 'pending'")
    assert nxt["run_after"] == nxt["scheduled_for"] - timedelta(minutes=10)


def test_enqueue_at_an_instant_is_claimable_a_lead_window_before_it(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    at = datetime(2030, 1, 2, 9, 0, tzinfo=UTC)

    async def main() -> None:
        conn = await connect(settings_for(db_url))
        async with conn:
            await enqueue_item(conn, t["project"]["id"], at=at, replace=False,
                               now=datetime.now(UTC), actor="test", lead_seconds=900)

    asyncio.run(main())
    item = one(db, "SELECT * FROM episode_schedule_queue WHERE project_id = %s",
               t["project"]["id"])
    assert (item["scheduled_for"], item["run_after"]) == (at, at - LEAD)


def test_a_slot_whose_episode_waits_to_be_published_is_not_planned_again(
    db_url: str, db: Conn
) -> None:
    """The episode for 09:00 was generated at 08:50 (its item completed, the episode waits for
    its instant); the project was paused and resumed before 09:00, which cancelled its next
    item. The scheduler plans tomorrow's 09:00, not a second episode for today's."""
    t = make_tenant(db, cadence={"mode": "daily"})
    now = datetime(2026, 3, 4, 8, 50, tzinfo=UTC)
    slot = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)  # London is on UTC in March before the 29th
    make_queue_item(db, t["project"], scheduled_for=slot, status="completed",
                    completed_at=now, delivery="scheduled")
    scheduler_pass(db_url, now)
    planned = one(db, "SELECT * FROM episode_schedule_queue WHERE status = 'pending'")
    assert planned["scheduled_for"] == slot + timedelta(days=1)


# -- earliest deadline first -------------------------------------------------------------------


def test_claims_take_the_earliest_delivery_instant_first(db_url: str, db: Conn) -> None:
    """Of two due items, the one due to be delivered sooner is claimed first, even though the
    other became claimable earlier (a longer wait after a retry, or an earlier lead)."""
    now = datetime.now(UTC)
    early = make_tenant(db)
    later = make_tenant(db)
    soon = make_queue_item(db, early["project"], scheduled_for=now + timedelta(minutes=2),
                           run_after=now - timedelta(seconds=5))
    make_queue_item(db, later["project"], scheduled_for=now + timedelta(minutes=10),
                    run_after=now - timedelta(minutes=5))

    async def main() -> list[queue.ClaimedItem]:
        conn = await connect(settings_for(db_url))
        async with conn:
            return await queue.claim_due_items(conn, worker="w", limit=1, lease_seconds=60)

    claimed = asyncio.run(main())
    assert [c.id for c in claimed] == [soon["id"]]


# -- cost-limit blocks keep the window ---------------------------------------------------------


def test_items_resumed_after_a_cost_block_keep_their_lead_window(db_url: str, db: Conn) -> None:
    """The breaker blocks an organisation's pending items, tomorrow's too; when they resume,
    tomorrow's is claimable a lead window before its instant again, not at it."""
    t = make_tenant(db)
    today = datetime.now(UTC).replace(microsecond=0)
    instant = today + timedelta(days=1, hours=2)
    item = make_queue_item(db, t["project"], scheduled_for=instant, run_after=instant - LEAD,
                           status="blocked", blocked_on=(today - timedelta(days=1)).date(),
                           last_error="daily cost limit")

    async def main() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            await BudgetLoop(pool, 1.0, policy="resume", default_limit=Decimal(50),
                             reserve_per_item=Decimal("0.50")).run_once(now=today)
        finally:
            await pool.close()

    asyncio.run(main())
    resumed = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert resumed["status"] == "pending"
    assert resumed["run_after"] == instant - LEAD
