"""On-time delivery (issue #15): generate within a lead window, publish at the delivery instant.

Everything runs on real PostgreSQL with the real worker, scheduler, budget loop and publisher.
Time is an input: delivery instants are put in the future or the past relative to the database's
clock, and the publisher's pass is given the instant as ``now``; nothing sleeps until a real
09:00.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from mf_worker import queue
from mf_worker.daemon import build, serve
from mf_worker.db import connect, open_pool
from mf_worker.engine.worker import Outcome
from mf_worker.generation import load_generator
from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop
from mf_worker.maintenance.publisher import (
    TIMER_SLACK,
    Publisher,
    PublisherConfig,
    PublishResult,
)
from mf_worker.observability.metrics import Metrics
from mf_worker.scheduling.cadence import next_occurrence
from mf_worker.scheduling.scheduler import enqueue_item
from mf_worker.status import read_snapshot, render_snapshot

from .conftest import settings_for
from .factories import make_note, make_queue_item, make_tenant, one
from .workers import SCRIPTED, run_burst, scheduler_pass

Conn = psycopg.Connection[dict[str, Any]]
LEAD = timedelta(minutes=15)


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
    # Within the year ahead that enqueue accepts.
    at = (datetime.now(UTC) + timedelta(days=30)).replace(hour=9, minute=0, second=0,
                                                          microsecond=0)

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
            await BudgetLoop(pool, BudgetConfig(
                policy="resume", default_limit=Decimal(50), reserve_per_item=Decimal("0.50"),
                interval=1.0)).run_once(now=today)
        finally:
            await pool.close()

    asyncio.run(main())
    resumed = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert resumed["status"] == "pending"
    assert resumed["run_after"] == instant - LEAD


# -- publish at the instant, not before --------------------------------------------------------


def publisher_pass(db_url: str, now: datetime | None) -> PublishResult:
    async def main() -> PublishResult:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            return await Publisher(pool).run_once(now=now)
        finally:
            await pool.close()

    return asyncio.run(main())


def early_item(db: Conn, t: dict[str, Any], instant: datetime, **kw: Any) -> dict[str, Any]:
    """An item due at ``instant`` (in the future) whose lead window has begun."""
    return make_queue_item(db, t["project"], scheduled_for=instant,
                           run_after=datetime.now(UTC) - timedelta(seconds=1), **kw)


def episode_of(db: Conn, item_id: str) -> dict[str, Any]:
    return one(db, "SELECT e.* FROM episodes e JOIN episode_schedule_queue q"
                   " ON q.episode_id = e.id WHERE q.id = %s", item_id)


def status_of(db: Conn, item_id: str) -> str | None:
    """The item's episode's status (None while it has none yet)."""
    row = db.execute("SELECT e.status FROM episodes e JOIN episode_schedule_queue q"
                     " ON q.episode_id = e.id WHERE q.id = %s", [item_id]).fetchone()
    return None if row is None else str(row["status"])


def events(db: Conn, kind: str) -> list[dict[str, Any]]:
    return db.execute("SELECT * FROM user_events WHERE event_type = %s", [kind]).fetchall()


def test_episode_finished_before_its_instant_is_scheduled_and_published_at_it(
    db_url: str, db: Conn
) -> None:
    """Generated in the lead window, the episode is 'scheduled' (the app does not show it): no
    published_at, no episode_ready event. A publisher pass a second before the instant leaves
    it; the pass at the instant makes it 'ready', published_at = the instant, with the event."""
    t = make_tenant(db)
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    item = early_item(db, t, instant)

    reports = run_burst(db_url)
    assert [r.outcome for r in reports] == [Outcome.SUCCESS]
    episode = episode_of(db, item["id"])
    assert (episode["status"], episode["published_at"]) == ("scheduled", None)
    queued = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert (queued["status"], queued["delivery"]) == ("completed", "scheduled")
    assert events(db, "episode_ready") == []

    assert publisher_pass(db_url, instant - timedelta(seconds=1)).published == []
    assert episode_of(db, item["id"])["status"] == "scheduled"

    result = publisher_pass(db_url, instant)
    assert [p.queue_id for p in result.published] == [item["id"]]
    episode = episode_of(db, item["id"])
    assert (episode["status"], episode["published_at"]) == ("ready", instant)
    ready = events(db, "episode_ready")
    assert len(ready) == 1 and ready[0]["user_id"] == t["user"]["id"]
    assert ready[0]["event_data"] == {"episode_id": episode["id"],
                                      "project_id": t["project"]["id"], "sequence_number": 1}
    queued = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert (queued["delivery"], queued["published_at"]) == ("published", instant)
    assert publisher_pass(db_url, instant + timedelta(seconds=5)).published == []  # once only


def test_episode_finished_after_its_instant_is_ready_at_once_and_reported_late(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db)
    instant = datetime.now(UTC) - timedelta(minutes=3)
    item = make_queue_item(db, t["project"], scheduled_for=instant)
    reports = run_burst(db_url)
    episode = episode_of(db, item["id"])
    assert episode["status"] == "ready" and episode["published_at"] >= instant
    assert len(events(db, "episode_ready")) == 1
    delivery = reports[0].delivery
    assert delivery is not None and delivery.published_at == episode["published_at"]
    assert delivery.lateness_seconds is not None and delivery.lateness_seconds >= 180


def test_publisher_sleeps_until_the_next_instant_not_an_interval(db_url: str, db: Conn) -> None:
    """The timer is set to the next waiting instant (plus a few ms), never past max_wait."""
    fixed = datetime(2030, 1, 1, 8, 59, 50, tzinfo=UTC)
    result = PublishResult(next_at=datetime(2030, 1, 1, 9, 0, tzinfo=UTC))

    async def main() -> tuple[float, float, float]:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            publisher = Publisher(pool, PublisherConfig(max_wait=30.0), clock=lambda: fixed)
            return (publisher.next_delay(result), publisher.next_delay(PublishResult()),
                    Publisher(pool, PublisherConfig(max_wait=5.0),
                              clock=lambda: fixed).next_delay(result))
        finally:
            await pool.close()

    timer, idle, capped = asyncio.run(main())
    assert timer == 10.0 + TIMER_SLACK
    assert (idle, capped) == (30.0, 5.0)


def test_publisher_loop_publishes_when_its_timer_fires(db_url: str, db: Conn) -> None:
    """The running loop (max_wait an hour, so only the timer can wake it in time) publishes an
    episode whose instant is half a second away, never before that instant."""
    t = make_tenant(db)
    instant = datetime.now(UTC) + timedelta(seconds=30)
    item = early_item(db, t, instant)
    run_burst(db_url)
    db.execute("UPDATE episode_schedule_queue SET scheduled_for = now() + interval '0.5 s'"
               " WHERE id = %s", [item["id"]])

    async def main() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        publisher = Publisher(pool, PublisherConfig(max_wait=3600.0))
        task = asyncio.create_task(publisher.run())
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                if status_of(db, item["id"]) == "ready":
                    break
        finally:
            publisher.stop()
            await task
            await pool.close()

    asyncio.run(main())
    episode = episode_of(db, item["id"])
    queued = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert episode["status"] == "ready"
    assert episode["published_at"] >= queued["scheduled_for"]


# -- changes before the instant ----------------------------------------------------------------


def test_pausing_a_project_before_the_instant_withdraws_its_episode(
    db_url: str, db: Conn
) -> None:
    """Kept, 'withdrawn' with the reason, never 'ready', no event; its usage stays booked; the
    planning notes it used are pending again for the next episode."""
    t = make_tenant(db)
    note = make_note(db, t["project"], note="More on policy")
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    item = early_item(db, t, instant)
    run_burst(db_url)
    used = one(db, "SELECT * FROM planning_notes WHERE id = %s", note["id"])
    assert used["status"] == "incorporated"

    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [t["project"]["id"]])
    result = publisher_pass(db_url, instant)
    assert result.published == [] and [w.reason for w in result.withdrawn] == ["project paused"]
    episode = episode_of(db, item["id"])
    assert (episode["status"], episode["withdrawn_reason"]) == ("withdrawn", "project paused")
    assert episode["published_at"] is None and events(db, "episode_ready") == []
    usage = one(db, "SELECT count(*) AS n FROM token_usage WHERE episode_id = %s", episode["id"])
    assert usage["n"] == 1
    back = one(db, "SELECT * FROM planning_notes WHERE id = %s", note["id"])
    assert (back["status"], back["episode_id"], back["processed_at"]) == ("pending", None, None)
    queued = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert queued["delivery"] == "withdrawn"
    assert queued["last_error"] == "episode withdrawn: project paused"
    audit = one(db, "SELECT count(*) AS n FROM audit_log WHERE action = 'episode.withdraw'")
    assert audit["n"] == 1


def test_a_project_paused_and_resumed_before_the_instant_gets_its_episode(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db)
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    item = early_item(db, t, instant)
    run_burst(db_url)
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [t["project"]["id"]])
    db.execute("UPDATE projects SET status = 'active' WHERE id = %s", [t["project"]["id"]])
    assert len(publisher_pass(db_url, instant).published) == 1
    assert episode_of(db, item["id"])["status"] == "ready"


def test_rescheduling_a_project_before_the_instant_withdraws_its_episode(
    db_url: str, db: Conn
) -> None:
    """The slot was 09:00 London; the user moved delivery to 10:00 before it: 09:00 is no
    longer one of the project's occurrences, so that episode is withdrawn."""
    cadence = {"mode": "daily", "days": []}
    t = make_tenant(db, cadence=cadence)
    instant = next_occurrence(cadence, time(9, 0), "Europe/London", datetime.now(UTC))
    item = early_item(db, t, instant, metadata=Jsonb({
        "cadence": cadence, "delivery_time": "09:00:00", "user_timezone": "Europe/London"}))
    run_burst(db_url)
    db.execute("UPDATE projects SET delivery_time = '10:00' WHERE id = %s", [t["project"]["id"]])
    result = publisher_pass(db_url, instant)
    assert [w.reason for w in result.withdrawn] == ["project rescheduled"]
    assert episode_of(db, item["id"])["status"] == "withdrawn"


def test_deleting_a_project_before_the_instant_withdraws_its_episode(
    db_url: str, db: Conn
) -> None:
    """The episode goes with the project (the cascade: the user deleted their content), the
    usage stays booked, and the queue item records the withdrawal; nothing is published."""
    t = make_tenant(db)
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    item = early_item(db, t, instant)
    run_burst(db_url)
    db.execute("DELETE FROM projects WHERE id = %s", [t["project"]["id"]])
    result = publisher_pass(db_url, instant)
    assert [w.reason for w in result.withdrawn] == ["project deleted"]
    queued = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert (queued["delivery"], queued["last_error"]) == (
        "withdrawn", "episode withdrawn: project deleted")
    assert one(db, "SELECT count(*) AS n FROM token_usage")["n"] == 1
    assert events(db, "episode_ready") == []


def test_notes_added_after_the_generation_wait_for_the_next_episode(
    db_url: str, db: Conn
) -> None:
    """A note written while the episode waits for its instant is not marked incorporated by
    its publication; the next generation receives it."""
    t = make_tenant(db)
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    item = early_item(db, t, instant)
    run_burst(db_url)
    assert episode_of(db, item["id"])["status"] == "scheduled"
    late_note = make_note(db, t["project"], note="Cover the new subsidy")
    publisher_pass(db_url, instant)
    note = one(db, "SELECT * FROM planning_notes WHERE id = %s", late_note["id"])
    assert (note["status"], note["episode_id"]) == ("pending", None)

    db.execute("UPDATE episode_schedule_queue SET run_after = now(), scheduled_for = now()"
               " WHERE status = 'pending'")
    run_burst(db_url)
    note = one(db, "SELECT * FROM planning_notes WHERE id = %s", late_note["id"])
    assert note["status"] == "incorporated"
    assert note["episode_id"] != episode_of(db, item["id"])["id"]


# -- lateness is measured ----------------------------------------------------------------------


def test_an_item_blocked_past_its_instant_is_late_in_status_and_counted_late(
    db_url: str, db: Conn
) -> None:
    """Blocked by the cost limit until the next UTC day, the item is listed as late by
    `status` and counted by the late-items gauge while it waits; resumed and generated, its
    episode is published at once and counted late, with its lateness in the histogram."""
    t = make_tenant(db)
    instant = datetime.now(UTC) - timedelta(hours=2)
    item = make_queue_item(db, t["project"], scheduled_for=instant, status="blocked",
                           blocked_on=datetime.now(UTC).date(), last_error="cost limit")

    async def snapshot() -> Any:
        conn = await connect(settings_for(db_url))
        async with conn:
            return await read_snapshot(conn, default_limit_gbp=Decimal(50))

    snap = asyncio.run(snapshot())
    assert snap.late_items == 1 and [i["id"] for i in snap.late] == [item["id"]]
    assert f"{item['id']}" in render_snapshot(snap) and "late 2.0 h" in render_snapshot(snap)

    db.execute("UPDATE episode_schedule_queue SET status = 'pending', blocked_on = NULL,"
               " run_after = now() WHERE id = %s", [item["id"]])
    metrics = Metrics(concurrency=1, process_metrics=False)
    for report in run_burst(db_url):
        metrics.on_attempt(report)
    assert metrics.registry.get_sample_value(
        "mf_worker_episodes_published_total", {"timing": "late"}) == 1
    assert metrics.registry.get_sample_value(
        "mf_worker_episodes_published_total", {"timing": "on_time"}) == 0
    assert metrics.registry.get_sample_value(
        "mf_worker_delivery_lateness_seconds_bucket", {"le": "3600.0"}) == 0
    assert metrics.registry.get_sample_value(
        "mf_worker_delivery_lateness_seconds_bucket", {"le": "7200.0"}) == 0
    assert asyncio.run(snapshot()).late_items == 0


def test_an_episode_published_by_the_timer_is_counted_on_time(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    early_item(db, t, instant)
    run_burst(db_url)
    metrics = Metrics(concurrency=1, process_metrics=False)
    for publication in publisher_pass(db_url, instant + timedelta(milliseconds=40)).published:
        metrics.on_published(publication)
    assert metrics.registry.get_sample_value(
        "mf_worker_episodes_published_total", {"timing": "on_time"}) == 1
    assert metrics.registry.get_sample_value(
        "mf_worker_delivery_lateness_seconds_bucket", {"le": "0.05"}) == 1


def test_the_daemon_publishes_an_early_episode_at_its_instant_not_at_its_poll(
    db_url: str, db: Conn
) -> None:
    """`mf-worker run` as wired by build(): with a one-minute poll interval and no LISTEN,
    the publisher would next look a minute after start; the worker's final write resets its
    timer to the episode's instant (2 s ahead), so the episode is ready well within the
    minute, and never before its instant."""
    t = make_tenant(db)
    item = early_item(db, t, datetime.now(UTC) + timedelta(seconds=2))

    async def main() -> None:
        settings = settings_for(db_url, poll_interval=60.0, listen=False)
        components = await build(settings, generator=load_generator(SCRIPTED))
        daemon = asyncio.create_task(serve(components, install_signals=False))
        try:
            for _ in range(400):  # 20 s: a third of the poll interval
                await asyncio.sleep(0.05)
                if status_of(db, item["id"]) == "ready":
                    break
        finally:
            components.worker.stop()
            await daemon

    asyncio.run(main())
    episode = episode_of(db, item["id"])
    assert episode["status"] == "ready"
    assert episode["published_at"] >= item["scheduled_for"]


def test_a_retry_inside_the_window_still_publishes_at_the_instant(
    db_url: str, db: Conn
) -> None:
    """A transient failure in the lead window backs off (run_after moves, scheduled_for does
    not); the retry succeeds before the instant, so the episode waits and is published then."""
    t = make_tenant(db, title="flaky:1")
    instant = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    item = early_item(db, t, instant)
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.RETRY]
    backing_off = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert backing_off["scheduled_for"] == instant and backing_off["run_after"] < instant
    db.execute("UPDATE episode_schedule_queue SET run_after = now() WHERE id = %s", [item["id"]])
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.SUCCESS]
    assert episode_of(db, item["id"])["status"] == "scheduled"
    assert len(publisher_pass(db_url, instant).published) == 1
    assert episode_of(db, item["id"])["status"] == "ready"
