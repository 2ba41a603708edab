"""Planning follows the project and the operator (issues #23 and #24): a delivery slot is generated
once, the final write plans from the project as it is at commit, `retry` starts afresh, the
pruner keeps what still waits, time inputs are checked, and claims put late items first.

Real PostgreSQL, the real worker (in this process), the real scheduler, pruner and CLI; the
generators here are fakes that really behave (they change the project while they generate).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from mf_worker import queue
from mf_worker.db import connect, open_pool
from mf_worker.engine.worker import Outcome
from mf_worker.generation import GenerationRequest, GenerationResult
from mf_worker.generators.template import TemplateGenerator
from mf_worker.maintenance.pruner import Pruner, PrunerConfig
from mf_worker.scheduling.cadence import next_occurrence
from mf_worker.status import cancel_queue_item

from .conftest import settings_for
from .factories import (
    item_state,
    make_note,
    make_org,
    make_project,
    make_queue_item,
    make_tenant,
    make_user,
    one,
)
from .workers import ROOT, run_burst, scheduler_pass, worker_env

Conn = psycopg.Connection[dict[str, Any]]
DAILY = {"mode": "daily", "days": []}
LONDON = "Europe/London"


def open_items(conn: Conn, project_id: str) -> list[dict[str, Any]]:
    return conn.execute("SELECT * FROM episode_schedule_queue WHERE project_id = %s AND status"
                        " IN ('pending', 'processing', 'blocked')", [project_id]).fetchall()


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                          text=True, env=worker_env(db_url), cwd=ROOT, timeout=120, check=False)


def cancel(db_url: str, item_id: str) -> None:
    """`mf-worker cancel`, in this process."""
    async def main() -> None:
        conn = await connect(settings_for(db_url))
        async with conn:
            await cancel_queue_item(conn, item_id, "not this one", actor="test")

    asyncio.run(main())


def planned_metadata(delivery: str = "09:00:00") -> Jsonb:
    return Jsonb({"cadence": DAILY, "delivery_time": delivery, "user_timezone": LONDON})


# -- #23.4 a slot is generated once -----------------------------------------------------------


def test_a_permanent_failure_in_the_lead_window_is_not_planned_again_for_its_slot(
    db_url: str, db: Conn
) -> None:
    """The item for the next 09:00 fails for good inside its lead window (a reply that never
    parses). The scheduler's next pass plans the following 09:00, not the same slot again: one
    generation per slot, so MF_MAX_ATTEMPTS bounds what a permanent failure costs."""
    t = make_tenant(db, title="permanent", cadence=DAILY)
    now = datetime.now(UTC)
    slot = next_occurrence(DAILY, time(9, 0), LONDON, now)
    item = make_queue_item(db, t["project"], scheduled_for=slot,
                           run_after=now - timedelta(seconds=1), metadata=planned_metadata())
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.FAILED]
    assert item_state(db, item["id"])["status"] == "failed"

    scheduler_pass(db_url, datetime.now(UTC))
    [planned] = open_items(db, t["project"]["id"])
    assert planned["scheduled_for"] == next_occurrence(DAILY, time(9, 0), LONDON, slot)
    assert one(db, "SELECT count(*) AS n FROM episode_schedule_queue WHERE scheduled_for = %s",
               slot)["n"] == 1


def test_cancelling_tomorrows_item_skips_that_delivery(db_url: str, db: Conn) -> None:
    """`mf-worker cancel` of a waiting item skips that delivery: the scheduler does not
    re-create it for the same instant; the project's next item is the following occurrence."""
    t = make_tenant(db, cadence=DAILY)
    now = datetime.now(UTC)
    scheduler_pass(db_url, now)
    [tomorrow] = open_items(db, t["project"]["id"])
    cancel(db_url, tomorrow["id"])
    scheduler_pass(db_url, datetime.now(UTC))
    [following] = open_items(db, t["project"]["id"])
    assert following["scheduled_for"] == next_occurrence(
        DAILY, time(9, 0), LONDON, tomorrow["scheduled_for"])
    row = one(db, "SELECT next_scheduled_at FROM projects WHERE id = %s", t["project"]["id"])
    assert row["next_scheduled_at"] == following["scheduled_for"]


def test_the_final_write_does_not_plan_a_slot_that_already_ended(db_url: str, db: Conn) -> None:
    """An operator cancelled tomorrow's item and enqueued one for now: when that one completes,
    its next item is the occurrence after tomorrow's, which was skipped."""
    t = make_tenant(db, cadence=DAILY)
    now = datetime.now(UTC)
    tomorrow = next_occurrence(DAILY, time(9, 0), LONDON, now)
    skipped = make_queue_item(db, t["project"], scheduled_for=tomorrow,
                              metadata=planned_metadata())
    cancel(db_url, skipped["id"])
    make_queue_item(db, t["project"], scheduled_for=now - timedelta(seconds=1),
                    metadata=Jsonb({"manual": True}))
    assert [r.outcome for r in run_burst(db_url, lead_seconds=0)] == [Outcome.SUCCESS]
    [nxt] = open_items(db, t["project"]["id"])
    assert nxt["scheduled_for"] == next_occurrence(DAILY, time(9, 0), LONDON, tomorrow)


def test_a_project_paused_and_resumed_before_its_slot_gets_it(db_url: str, db: Conn) -> None:
    """The pause cancelled tomorrow's waiting item, but that was the system, not a skipped
    delivery: resumed before the instant, the project is planned for the same slot again."""
    t = make_tenant(db, cadence=DAILY)
    scheduler_pass(db_url, datetime.now(UTC))
    [planned] = open_items(db, t["project"]["id"])
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [t["project"]["id"]])
    scheduler_pass(db_url, datetime.now(UTC))
    assert item_state(db, planned["id"])["status"] == "cancelled"
    db.execute("UPDATE projects SET status = 'active' WHERE id = %s", [t["project"]["id"]])
    scheduler_pass(db_url, datetime.now(UTC))
    [again] = open_items(db, t["project"]["id"])
    assert again["scheduled_for"] == planned["scheduled_for"]


def test_retry_of_a_skipped_item_opens_its_slot_again(db_url: str, db: Conn) -> None:
    """An operator who cancelled tomorrow's item and then `retry`s it has it again: the mark
    that skipped the slot goes with the retry."""
    t = make_tenant(db, cadence=DAILY)
    slot = next_occurrence(DAILY, time(9, 0), LONDON, datetime.now(UTC))
    item = make_queue_item(db, t["project"], scheduled_for=slot, metadata=planned_metadata())
    cancel(db_url, item["id"])
    assert item_state(db, item["id"])["metadata"]["skipped"] is True
    assert cli(db_url, "retry", item["id"]).returncode == 0
    assert "skipped" not in item_state(db, item["id"])["metadata"]


def test_an_item_replaced_by_enqueue_does_not_skip_its_slot(db_url: str, db: Conn) -> None:
    """`enqueue --replace` moves the delivery instead of skipping one: once the operator's item
    completes, the replaced slot is planned again."""
    t = make_tenant(db, cadence=DAILY)
    scheduler_pass(db_url, datetime.now(UTC))
    [planned] = open_items(db, t["project"]["id"])
    done = cli(db_url, "enqueue", t["project"]["id"], "--replace")
    assert done.returncode == 0, done.stderr
    # No lead: the replaced slot's new item must not be claimed in this burst too.
    assert [r.outcome for r in run_burst(db_url, lead_seconds=0)] == [Outcome.SUCCESS]
    [nxt] = open_items(db, t["project"]["id"])
    assert nxt["scheduled_for"] == planned["scheduled_for"]


# -- #24.3 retry starts afresh ------------------------------------------------------------------


def test_retry_gives_the_item_a_fresh_deadline_backoff_and_lost_count(
    db_url: str, db: Conn
) -> None:
    """An item failed after an outage: first picked up five hours ago (past MF_RETRY_DEADLINE),
    eight transient failures in, a worker lost twice. `retry` restarts all of it and says so:
    its first transient failure afterwards backs off a second instead of failing at once."""
    t = make_tenant(db, title="flaky:1")
    item = make_queue_item(
        db, t["project"], status="failed", attempt_count=9, retry_count=8, lost_count=2,
        deferred_count=3, deferred_reason=None, picked_up_at=datetime.now(UTC) - timedelta(hours=5),
        last_error="gave up after 8 transient failures")
    done = cli(db_url, "retry", item["id"])
    assert done.returncode == 0, done.stderr
    assert "fresh" in done.stdout and "deadline" in done.stdout, done.stdout
    state = item_state(db, item["id"])
    assert (state["status"], state["attempt_count"], state["retry_count"], state["lost_count"],
            state["picked_up_at"]) == ("pending", 0, 0, 0, None)

    reports = run_burst(db_url, poll_interval=0.05)
    assert reports[0].outcome is Outcome.RETRY, reports[0].error
    state = item_state(db, item["id"])
    assert state["retry_count"] == 1 and state["status"] in ("pending", "completed")


# -- #24.5 / #24.6 the final write reads the project as it is at commit ------------------------


class ChangesTheProject:
    """Generates the template episode, but first runs ``sql`` on the project (as the web app
    would while the LLM writes): a pause, a new delivery time, a deletion."""

    def __init__(self, db_url: str, sql: str) -> None:
        self.db_url, self.sql = db_url, sql
        self.template = TemplateGenerator()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        def change() -> None:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                conn.execute(self.sql, [request.project.id])

        await asyncio.to_thread(change)
        return self.template.write(request)


@pytest.mark.parametrize("instant_passed", [False, True])
def test_a_project_paused_mid_generation_gets_no_next_item_and_its_episode_is_withdrawn(
    db_url: str, db: Conn, instant_passed: bool
) -> None:
    """Paused while its episode was being written: the episode is never shown ('withdrawn',
    with the reason; its usage stays booked), the notes it used wait for the next episode, and
    the project gets no next item and no next_scheduled_at."""
    t = make_tenant(db, cadence=DAILY)
    note = make_note(db, t["project"])
    now = datetime.now(UTC)
    instant = now - timedelta(minutes=1) if instant_passed else now + timedelta(minutes=10)
    item = make_queue_item(db, t["project"], scheduled_for=instant,
                           run_after=now - timedelta(seconds=1), metadata=planned_metadata())
    db.execute("UPDATE projects SET next_scheduled_at = %s WHERE id = %s",
               [instant, t["project"]["id"]])
    gen = ChangesTheProject(db_url, "UPDATE projects SET status = 'paused' WHERE id = %s")
    [report] = run_burst(db_url, gen)
    assert report.outcome is Outcome.SUCCESS
    done = item_state(db, item["id"])
    assert (done["status"], done["delivery"]) == ("completed", "withdrawn")
    assert done["last_error"] == "episode withdrawn: project paused"
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", done["episode_id"])
    assert (episode["status"], episode["withdrawn_reason"], episode["published_at"]) == (
        "withdrawn", "project paused", None)
    assert one(db, "SELECT count(*) AS n FROM token_usage WHERE episode_id = %s",
               episode["id"])["n"] == 1
    assert db.execute("SELECT * FROM user_events WHERE event_type = 'episode_ready'"
                      ).fetchall() == []
    assert one(db, "SELECT status FROM planning_notes WHERE id = %s", note["id"])["status"] == (
        "pending")
    assert open_items(db, t["project"]["id"]) == []
    assert one(db, "SELECT next_scheduled_at FROM projects WHERE id = %s",
               t["project"]["id"])["next_scheduled_at"] is None


def test_a_delivery_time_changed_mid_generation_plans_the_next_item_from_the_new_one(
    db_url: str, db: Conn
) -> None:
    """The user moved delivery from 09:00 to another hour (18:00 in the issue; here six hours
    from now, so the next item is never due during the test) while the episode was generated:
    the next item is planned at the new time, not at the 09:00 read when the generation was
    prepared."""
    t = make_tenant(db, cadence=DAILY)
    now = datetime.now(UTC)
    moved = time((now.hour + 6) % 24, 0)
    item = make_queue_item(db, t["project"], scheduled_for=now - timedelta(minutes=1),
                           metadata=planned_metadata())
    gen = ChangesTheProject(db_url, f"UPDATE projects SET delivery_time = '{moved}' WHERE id = %s")
    assert [r.outcome for r in run_burst(db_url, gen, lead_seconds=0)] == [Outcome.SUCCESS]
    [nxt] = open_items(db, t["project"]["id"])
    after = max(item["scheduled_for"], nxt["created_at"] - timedelta(seconds=5))
    assert nxt["scheduled_for"] == next_occurrence(DAILY, moved, LONDON, after)
    assert nxt["metadata"]["delivery_time"] == moved.isoformat()


def test_a_project_deleted_mid_generation_cancels_the_item_with_its_usage_booked(
    db_url: str, db: Conn
) -> None:
    """Deleted while its episode was being written: no foreign-key failure, no crashed item for
    the reaper; the item is cancelled ('project deleted') and the usage the generator reported
    is booked (not an estimate)."""
    t = make_tenant(db, cadence=DAILY)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC))
    gen = ChangesTheProject(db_url, "DELETE FROM projects WHERE id = %s")
    [report] = run_burst(db_url, gen)
    assert report.outcome is Outcome.CANCELLED, (report.outcome, report.error)
    done = item_state(db, item["id"])
    assert (done["status"], done["last_error"], done["locked_by"]) == (
        "cancelled", "project deleted", None)
    usage = db.execute("SELECT * FROM token_usage").fetchall()
    assert [(u["model"], u["estimated"]) for u in usage] == [("template", False)]
    assert usage[0]["total_tokens"] > 0 and usage[0]["organization_id"] == t["org"]["id"]
    daily = one(db, "SELECT * FROM token_usage_daily WHERE organization_id = %s", t["org"]["id"])
    assert daily["total_tokens"] == usage[0]["total_tokens"]


# -- #24.7 the pruner keeps what still waits ----------------------------------------------------


def test_the_pruner_keeps_items_whose_episode_still_waits_for_its_instant(
    db_url: str, db: Conn
) -> None:
    """Generated more than MF_RETENTION_DAYS before its instant (`run-once --id` on a far item):
    its item says the episode waits ('scheduled'), so it is kept until it is published or
    withdrawn; a published one of the same age goes."""
    t = make_tenant(db)
    old = datetime.now(UTC) - timedelta(days=40)
    waiting = make_queue_item(db, make_project(db, t["user"]), status="completed",
                              completed_at=old, scheduled_for=datetime.now(UTC) + timedelta(days=5),
                              delivery="scheduled")
    published = make_queue_item(db, make_project(db, t["user"]), status="completed",
                                completed_at=old, scheduled_for=old, delivery="published")
    db.execute("UPDATE episode_schedule_queue SET finished_at = %s", [old])

    async def prune() -> int:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            return await Pruner(pool, PrunerConfig(retention_days=30)).run_once()
        finally:
            await pool.close()

    assert asyncio.run(prune()) == 1
    left = [r["id"] for r in db.execute("SELECT id FROM episode_schedule_queue").fetchall()]
    assert left == [waiting["id"]] and published["id"] not in left


# -- #24.8 time inputs are checked ----------------------------------------------------------------


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00Z", "1999-12-31T23:59:59Z",
                                "9999-12-31T23:59:59-01:00", "2200-01-01T09:00:00+01:00"])
def test_enqueue_refuses_an_instant_out_of_range_with_exit_2(
    db_url: str, db: Conn, at: str
) -> None:
    """Not before 2000, not more than a year ahead: one clear line and exit 2, never a
    traceback, whatever the owner's zone (Europe/London overflowed at year 1)."""
    project = make_project(db, make_user(db, make_org(db), timezone=LONDON))
    result = cli(db_url, "enqueue", project["id"], "--at", at)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "--at" in result.stderr and ("2000" in result.stderr or "year" in result.stderr)
    assert db.execute("SELECT * FROM episode_schedule_queue").fetchall() == []


# -- #24.9 claim order ----------------------------------------------------------------------------


def test_an_item_past_its_instant_is_claimed_before_fair_turns_of_items_still_early(
    db_url: str, db: Conn
) -> None:
    """Organisation A already has two items processing (its turn is behind) and one item past
    its delivery instant; organisation B's item is due in 14 minutes (claimable: it is in its
    lead window). The late item goes first: on-time delivery before the fair turn."""
    now = datetime.now(UTC)
    busy, early = make_tenant(db), make_tenant(db)
    for _ in range(2):
        make_queue_item(db, make_project(db, busy["user"]), status="processing",
                        locked_by="elsewhere", claim_token=1,
                        lease_expires_at=now + timedelta(minutes=5))
    late = make_queue_item(db, busy["project"], scheduled_for=now - timedelta(minutes=1),
                           run_after=now - timedelta(seconds=30))
    make_queue_item(db, early["project"], scheduled_for=now + timedelta(minutes=14),
                    run_after=now - timedelta(minutes=1))

    async def claim() -> list[queue.ClaimedItem]:
        conn = await connect(settings_for(db_url))
        async with conn:
            return await queue.claim_due_items(conn, worker="w", limit=1, lease_seconds=60)

    assert [c.id for c in asyncio.run(claim())] == [late["id"]]
