"""A daily limit that is really hard: every call that may have been billed is booked, on the day
its reservation was taken (issue #14). Real PostgreSQL, the real worker, reaper and budget loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mf_worker import queue
from mf_worker.db import connect, open_pool
from mf_worker.engine.prepare import Prepared, prepare_generations
from mf_worker.engine.worker import Outcome
from mf_worker.engine.write import EpisodeWrite, write_episodes
from mf_worker.generators.template import TemplateGenerator
from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop
from mf_worker.maintenance.reaper import Reaper, ReaperConfig
from mf_worker.observability.metrics import Metrics
from mf_worker.status import cancel_queue_item

from .conftest import settings_for
from .factories import make_episode, make_org, make_project, make_queue_item, make_user
from .workers import run_burst, start_worker, wait_until

Conn = psycopg.Connection[dict[str, Any]]
HALF = Decimal("0.50")


def daily(db: Conn, org_id: str) -> dict[str, Any]:
    row = db.execute("SELECT * FROM token_usage_daily WHERE organization_id = %s",
                     [org_id]).fetchone()
    assert row is not None, "no aggregate row: nothing was booked"
    return row


def org_with_items(db: Conn, n: int, title: str, limit: str | None) -> dict[str, Any]:
    org = make_org(db, daily_cost_limit_gbp=limit)
    user = make_user(db, org)
    for _ in range(n):
        make_queue_item(db, make_project(db, user, title=title),
                        scheduled_for=datetime.now(UTC) - timedelta(minutes=1))
    return org


def test_billed_calls_whose_output_failed_validation_count_against_the_limit(
    db_url: str, db: Conn
) -> None:
    """£1.00 a day, calls that cost £0.50 and return output that fails validation: two calls
    use the day up, the third is refused — not four calls and £0.00 booked."""
    org = org_with_items(db, 4, "costly-invalid", limit="1.00")
    reports = run_burst(db_url, concurrency=1, max_attempts=1)
    outcomes = [r.outcome for r in reports]
    assert outcomes.count(Outcome.FAILED) == 2 and Outcome.BLOCKED in outcomes
    day = daily(db, org["id"])
    assert day["total_cost_gbp"] == Decimal("1.00") and day["reserved_gbp"] == 0
    assert day["estimated_cost_gbp"] == 0  # the real usage was known and booked
    rows = db.execute("SELECT model, cost_gbp, estimated FROM token_usage").fetchall()
    assert rows == [{"model": "gpt-4o", "cost_gbp": HALF, "estimated": False}] * 2


def test_a_refusal_that_carries_usage_books_it(db_url: str, db: Conn) -> None:
    """A generator error may carry the usage of the calls it made (a refusal is billed)."""
    org = org_with_items(db, 1, "costly-refused", limit="5")
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.FAILED]
    assert daily(db, org["id"])["total_cost_gbp"] == HALF


def test_status_shows_estimated_spend_apart_from_measured(db_url: str, db: Conn) -> None:
    """One call measured (£0.50), one abandoned with its £1.25 reservation booked: status says
    which is which."""
    from .test_engine import cli

    org = org_with_items(db, 1, "costly-refused", limit="5")
    run_burst(db_url)
    make_queue_item(db, make_project(db, make_user(db, org)))
    asyncio.run(_claim_and_prepare(db_url, Decimal("1.25")))
    _reap(db_url, db)
    result = cli("status", url=db_url)
    assert result.returncode == 0, result.stderr
    assert f"{org['id']}  £0.50 measured + £1.25 estimated, £0.00 reserved, limit £5.00" in (
        result.stdout)


def test_a_timed_out_generation_books_its_reserved_worst_case_as_an_estimate(
    db_url: str, db: Conn
) -> None:
    """The provider usually finishes and bills a call we stopped waiting for: its reservation
    (the flat reserve here) is booked, marked as an estimate, on the reservation's day."""
    org = org_with_items(db, 1, "slow:30", limit="5")
    # A timeout is transient: bounded by MF_RETRY_DEADLINE (0 here: no retry), not attempts.
    reports = run_burst(db_url, generation_timeout=0.3, retry_deadline=0,
                        cost_reserve_gbp=Decimal("0.40"))
    assert [r.outcome for r in reports] == [Outcome.FAILED]
    day = daily(db, org["id"])
    assert day["total_cost_gbp"] == Decimal("0.40") == day["estimated_cost_gbp"]
    assert day["reserved_gbp"] == 0
    row = db.execute("SELECT estimated, billing_date FROM token_usage").fetchone()
    assert row == {"estimated": True, "billing_date": day["date"]}


async def _claim_and_prepare(db_url: str, amount: Decimal, *, now: datetime | None = None
                             ) -> tuple[queue.ClaimedItem, Prepared]:
    conn = await connect(settings_for(db_url))
    async with conn:
        [item] = await queue.claim_due_items(conn, worker="ghost", limit=1, lease_seconds=60)
        [prepared] = await prepare_generations(conn, [item], now=now,
                                               worst_case=lambda _r: amount,
                                               default_limit=Decimal(50))
        assert isinstance(prepared, Prepared), prepared
        return item, prepared


def _reap(db_url: str, db: Conn) -> None:
    db.execute("UPDATE episode_schedule_queue SET lease_expires_at = now() - interval '1 s'"
               " WHERE status = 'processing'")

    async def go() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            await Reaper(pool, ReaperConfig(lease_seconds=60, max_attempts=3)).run_once()
        finally:
            await pool.close()

    asyncio.run(go())


def _operator_cancel(db_url: str, db: Conn) -> None:
    item_id = db.execute("SELECT id FROM episode_schedule_queue WHERE status = 'processing'"
                         ).fetchone()["id"]  # type: ignore[index]

    async def go() -> None:
        conn = await connect(settings_for(db_url))
        async with conn:
            await cancel_queue_item(conn, item_id, "operator", actor="test")

    asyncio.run(go())


@pytest.mark.parametrize("abandon", [_reap, _operator_cancel], ids=["reaped", "cancelled"])
def test_an_abandoned_attempt_books_its_reservation_as_an_estimate(
    db_url: str, db: Conn, abandon: Callable[[str, Conn], None]
) -> None:
    """A worker reserved £1.25 and started generating, then crashed (the reaper returns the
    item) or an operator cancelled it: the call may have been billed, so £1.25 is booked."""
    org = org_with_items(db, 1, "fine", limit="5")
    asyncio.run(_claim_and_prepare(db_url, Decimal("1.25")))
    abandon(db_url, db)
    day = daily(db, org["id"])
    assert (day["total_cost_gbp"], day["estimated_cost_gbp"], day["reserved_gbp"]) == (
        Decimal("1.25"), Decimal("1.25"), 0)


def test_a_sigterm_hand_back_mid_generation_books_spend_and_keeps_the_attempt(
    db_url: str, db: Conn, tmp_path: Path
) -> None:
    """Shutdown hands back an item whose generation had started: the call may have been
    billed, so its reservation is booked and the attempt is not given back."""
    import signal

    org = org_with_items(db, 1, "slow:60", limit="5")
    worker = start_worker(db_url, log=tmp_path / "w.log", MF_SHUTDOWN_GRACE="0.2",
                          MF_COST_RESERVE_GBP="0.30")
    try:
        wait_until(lambda: db.execute("SELECT 1 FROM episodes WHERE status = 'generating'"
                                      ).fetchone() is not None, 60, "the generation to start")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    item = db.execute("SELECT status, attempt_count FROM episode_schedule_queue").fetchone()
    assert item == {"status": "pending", "attempt_count": 1}
    day = daily(db, org["id"])
    assert (day["total_cost_gbp"], day["estimated_cost_gbp"]) == (Decimal("0.30"),) * 2


def test_usage_is_filed_under_the_day_its_reservation_was_taken(db_url: str, db: Conn) -> None:
    """Reserved before midnight, written after it: the cost lands on the reservation's day, the
    day whose limit allowed it — not on a day that never saw it reserved."""
    org = org_with_items(db, 1, "fine", limit="1.00")
    yesterday = datetime.now(UTC) - timedelta(days=1)

    async def go() -> None:
        item, prepared = await _claim_and_prepare(db_url, Decimal("0.80"), now=yesterday)
        result = TemplateGenerator().write(prepared.request)
        write = EpisodeWrite(item=item, prepared=prepared, result=result,
                             costs=(Decimal("0.80"),), now=datetime.now(UTC))
        conn = await connect(settings_for(db_url))
        async with conn:
            [outcome] = await write_episodes(conn, [write])
            assert not isinstance(outcome, Exception), outcome

    asyncio.run(go())
    rows = db.execute("SELECT date, total_cost_gbp, reserved_gbp FROM token_usage_daily"
                      " WHERE organization_id = %s", [org["id"]]).fetchall()
    assert rows == [{"date": yesterday.date(), "total_cost_gbp": Decimal("0.80"),
                     "reserved_gbp": 0}]


def test_a_new_organisation_follows_the_configured_default_limit(db: Conn) -> None:
    """MF_DAILY_COST_LIMIT_GBP applies to every organisation without a limit of its own; a new
    organisation has none unless one is set."""
    org = db.execute("INSERT INTO organizations (name) VALUES ('New') RETURNING *").fetchone()
    assert org is not None and org["daily_cost_limit_gbp"] is None


def test_episode_count_counts_distinct_episodes(db: Conn) -> None:
    """A generator that reports two usages for one episode (a draft and a repair call) made one
    episode, not two."""
    org = make_org(db)
    project = make_project(db, make_user(db, org))
    episode = make_episode(db, project)
    with db.transaction():
        db.execute("SELECT set_config('app.current_org_id', %s, true)", [org["id"]])
        for _ in range(2):
            db.execute(
                "INSERT INTO token_usage (organization_id, project_id, episode_id, operation,"
                " model, prompt_tokens, completion_tokens, cost_gbp)"
                " VALUES (%s, %s, %s, 'episode_generation', 'm', 5, 5, 0.01)",
                [org["id"], project["id"], episode["id"]])
        # And two rows in one statement (as the final write books a draft and a repair call).
        second = make_episode(db, project, sequence_number=2)
        db.execute(
            "INSERT INTO token_usage (organization_id, project_id, episode_id, operation,"
            " model, prompt_tokens, completion_tokens, cost_gbp)"
            " SELECT %s, %s, %s, 'episode_generation', 'm', 5, 5, 0.01"
            " FROM generate_series(1, 2)", [org["id"], project["id"], second["id"]])
    assert daily(db, org["id"])["episode_count"] == 2


def _budget_pass(db_url: str, now: datetime | None = None) -> Any:
    async def go() -> Any:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            loop = BudgetLoop(pool, BudgetConfig(policy="resume", default_limit=Decimal(50),
                                             reserve_per_item=Decimal("0.10"), interval=1.0))
            return await loop.run_once(now or datetime.now(UTC))
        finally:
            await pool.close()

    return asyncio.run(go())


def test_the_budget_loop_resumes_only_when_the_refused_worst_case_fits(
    db_url: str, db: Conn
) -> None:
    """Blocked because the next episode may cost £2.00 with £1.50 of £3.00 left: the flat
    reserve (£0.10) fits, the real worst case does not, so nothing resumes — and so nothing
    claims, is refused and blocks again every pass."""
    org = org_with_items(db, 1, "fine", limit="3.00")
    asyncio.run(_claim_and_prepare(db_url, Decimal("1.50")))
    db.execute("UPDATE episode_schedule_queue SET status = 'completed', completed_at = now(),"
               " reserved_cost_gbp = NULL, reserved_on = NULL WHERE status = 'processing'")
    db.execute("UPDATE token_usage_daily SET total_cost_gbp = 1.50")
    make_queue_item(db, make_project(db, make_user(db, org)))
    refused = asyncio.run(_claim_and_prepare_refused(db_url, Decimal("2.00")))
    assert refused == "blocked"
    assert _budget_pass(db_url).resumed == 0
    db.execute("UPDATE organizations SET daily_cost_limit_gbp = 3.50 WHERE id = %s",
               [org["id"]])
    assert _budget_pass(db_url).resumed == 1


async def _claim_and_prepare_refused(db_url: str, amount: Decimal) -> str:
    """Claim the due item, have its reservation refused, and let the worker's breaker act."""
    from mf_worker.cost.budget import CostLimitReached, trip_breaker

    conn = await connect(settings_for(db_url))
    async with conn:
        [item] = await queue.claim_due_items(conn, worker="ghost", limit=1, lease_seconds=60)
        [outcome] = await prepare_generations(conn, [item], now=None,
                                              worst_case=lambda _r: amount,
                                              default_limit=Decimal(50))
        assert isinstance(outcome, CostLimitReached), outcome
        await trip_breaker(conn, item, outcome)
        cur = await conn.execute("SELECT status FROM episode_schedule_queue WHERE id = %s",
                                 [item.id])
        row = await cur.fetchone()
        assert row is not None
        return str(row["status"])


def test_a_refusal_caused_only_by_reservations_defers_without_a_trip(
    db_url: str, db: Conn
) -> None:
    """£1.00 a day, nothing spent, £0.75 reserved by a generation in flight: an item that needs
    £0.50 is refused by reservations alone, which will settle. It waits (pending again, no
    attempt used) without blocking the organisation or using up the day's one notification."""
    org = org_with_items(db, 2, "fine", limit="1.00")
    asyncio.run(_claim_and_prepare(db_url, Decimal("0.75")))
    assert asyncio.run(_claim_and_prepare_refused(db_url, HALF)) == "pending"
    assert db.execute("SELECT count(*) AS n FROM cost_limit_trips").fetchone() == {"n": 0}
    assert db.execute("SELECT count(*) AS n FROM episode_schedule_queue WHERE status ="
                      " 'blocked' AND organization_id = %s", [org["id"]]).fetchone() == {"n": 0}


def test_a_call_dearer_than_its_reservation_books_the_real_cost_and_counts_the_excess(
    db_url: str, db: Conn
) -> None:
    """No estimate from the generator: the flat reserve (£0.10) is not an upper bound. The real
    £0.50 is booked, and the £0.40 over the reservation is a metric."""
    org = org_with_items(db, 1, "costly:0", limit="5")
    reports = run_burst(db_url, cost_reserve_gbp=Decimal("0.10"))
    assert [r.outcome for r in reports] == [Outcome.SUCCESS]
    assert daily(db, org["id"])["total_cost_gbp"] == HALF
    metrics = Metrics(concurrency=1)
    for report in reports:
        metrics.on_attempt(report)
    assert metrics.registry.get_sample_value("mf_worker_cost_overrun_gbp_total") == float(
        Decimal("0.40"))


