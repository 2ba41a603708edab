"""Cost control: exact prices, an atomic budget under racing workers, the breaker, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from time import monotonic, sleep
from typing import Any, ClassVar

import psycopg
import pytest

from mf_worker import cost, queue
from mf_worker.cost.budget import CostLimitReached, Trip
from mf_worker.cost.notify import WebhookNotifier, load_notifier
from mf_worker.cost.pricing import load_price_table
from mf_worker.db import act_for, open_pool
from mf_worker.engine.prepare import Prepared, prepare_generations
from mf_worker.engine.worker import Outcome
from mf_worker.errors import ConfigError, PluginLoadError
from mf_worker.generation import TokenUsage
from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig

from .conftest import settings_for
from .factories import make_org, make_project, make_queue_item, make_user
from .workers import run_burst, start_worker

Conn = psycopg.Connection[dict[str, Any]]


def scalar(conn: Conn, sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return next(iter(row.values()))


def on_trip_day(db: Conn, days: int = 0) -> datetime:
    """The time now, moved onto the UTC day the breaker tripped (plus ``days``).

    The day of a trip is the worker's, read while it ran; a test that reads its own clock
    afterwards would speak of another day if midnight UTC fell in between."""
    day = scalar(db, "SELECT date FROM cost_limit_trips")
    now = datetime.now(UTC)
    return now + timedelta(days=(day - now.date()).days + days)


def wait_until_gated(db: Conn, names: set[str], timeout: float = 60) -> None:
    """Wait until every named process has a session waiting for a lock (the test's gate)."""
    deadline = monotonic() + timeout
    while True:
        row = db.execute(
            "SELECT count(DISTINCT application_name) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = ANY(%s)"
            " AND wait_event_type = 'Lock'", [[f"mf-worker {n}" for n in names]]).fetchone()
        if row is not None and row["n"] == len(names):
            return
        if monotonic() > deadline:
            pytest.fail("the workers never reached the gate")
        sleep(0.02)


def org_with_items(conn: Conn, n: int, title: str, limit: str | None = "2.50") -> dict[str, Any]:
    org = make_org(conn, daily_cost_limit_gbp=limit)
    user = make_user(conn, org)
    for _ in range(n):
        make_queue_item(conn, make_project(conn, user, title=title))
    return org


# -- prices ------------------------------------------------------------------------------------


def test_cost_is_exact_decimal_and_unknown_models_are_priced_dear_and_logged_once(
    captured_logs: io.StringIO,
) -> None:
    table = load_price_table()
    assert table.cost(TokenUsage("gpt-4o", 125_000, 31_250)) == Decimal("0.500000")
    assert table.cost(TokenUsage("gpt-4o-mini", 1, 1)) == Decimal("0.000001")  # rounded up
    assert table.cost(TokenUsage("template", 10**6, 10**6)) == 0
    dearest = max(p.completion_gbp_per_million for p in table.models.values())
    assert table.default.completion_gbp_per_million == dearest
    assert table.cost(TokenUsage("mystery-70b", 0, 1_000_000)) == dearest
    table.cost(TokenUsage("mystery-70b", 1, 1))
    logged = captured_logs.getvalue()
    assert logged.count('"model_price_unknown"') == 1 and "mystery-70b" in logged


def test_pricing_file_overrides_and_a_malformed_entry_is_named(tmp_path: Path) -> None:
    good = tmp_path / "prices.toml"
    good.write_text('[models."local-llama"]\nprompt_gbp_per_million = 0\n'
                    'completion_gbp_per_million = 0.1\n[default]\n'
                    'prompt_gbp_per_million = 20\ncompletion_gbp_per_million = 80\n')
    table = load_price_table(good)
    assert table.cost(TokenUsage("local-llama", 10**6, 10**6)) == Decimal("0.1")
    assert table.cost(TokenUsage("other", 10**6, 0)) == 20
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."x"]\nprompt_gbp_per_million = "cheap"\n'
                   'completion_gbp_per_million = 1\n')
    with pytest.raises(ConfigError, match=r'\[models."x"\].prompt_gbp_per_million'):
        load_price_table(bad)
    negative = tmp_path / "neg.toml"
    negative.write_text('[default]\nprompt_gbp_per_million = -1\ncompletion_gbp_per_million = 1\n')
    with pytest.raises(ConfigError, match="non-negative"):
        load_price_table(negative)


# -- the budget under concurrency -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_four_racing_worker_processes_start_exactly_five_generations_within_budget(
    db_url: str, worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    """£2.50 and £0.50 per generation, twenty items: exactly five start, fifteen are blocked
    (after waiting out the reservations in flight), spend stays within the limit, and the
    aggregate equals the raw rows.

    Process start-up takes longer than the whole run, so without help the first process
    claims and reserves everything alone and nothing races (3 of 3 runs). A gate makes the
    race real: the test locks the queue until all four processes wait for it, then lets them
    go at once. Each process holds at most two items, for two seconds each, so one process
    cannot take all five reservations in the instant before the others prepare (with five
    items each, one busy-machine run saw a single process win all five)."""
    org = org_with_items(db, 20, "costly:2", limit="2.50")
    names = {f"w{i}" for i in range(4)}
    with psycopg.connect(db_url) as gate:
        gate.execute("LOCK TABLE episode_schedule_queue IN ACCESS EXCLUSIVE MODE")
        # As the least-privilege role: reservations and the breaker under row-level security.
        workers = [start_worker(worker_role_url, "--burst", log=tmp_path / f"{name}.log",
                                MF_CONCURRENCY="2", MF_POOL_MAX_SIZE="6", MF_WORKER_ID=name)
                   for name in sorted(names)]
        try:
            wait_until_gated(db, names)
        except BaseException:
            for w in workers:
                w.kill()
                w.wait()
            raise
        gate.commit()  # open the gate
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]

    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE status = 'completed'"
                      " AND organization_id = %s", org["id"]) == 5
    # While the five were in flight, items refused only because of their reservations waited
    # (pending again, no attempt used, no trip); once the five settled at £2.50 the rest are
    # refused by spend. Bring the waiting ones forward instead of sleeping out their wait.
    db.execute("UPDATE episode_schedule_queue SET run_after = now()"
               " WHERE status = 'pending' AND scheduled_for <= now()")
    again = start_worker(worker_role_url, "--burst", log=tmp_path / "w4.log", MF_WORKER_ID="w4")
    assert again.wait(timeout=120) == 0
    # The twenty seeded items (completed projects' next occurrences are later and may be
    # blocked too, depending on timing).
    blocked = db.execute("SELECT * FROM episode_schedule_queue WHERE status = 'blocked'"
                         " AND scheduled_for <= now()").fetchall()
    assert len(blocked) == 15
    assert all(b["attempt_count"] == 0 for b in blocked)  # blocking charges no attempt
    assert all(b["last_error"].startswith("Daily limit exceeded: £") for b in blocked)
    assert scalar(db, "SELECT count(*) FROM episodes WHERE status = 'ready'") == 5
    daily = db.execute("SELECT * FROM token_usage_daily WHERE organization_id = %s",
                       [org["id"]]).fetchone()
    assert daily is not None
    assert daily["total_cost_gbp"] == 5 * Decimal("0.50")
    limit = scalar(db, "SELECT daily_cost_limit_gbp FROM organizations WHERE id = %s", org["id"])
    assert daily["total_cost_gbp"] <= limit
    assert daily["total_cost_gbp"] == scalar(db, "SELECT sum(cost_gbp) FROM token_usage")
    assert daily["reserved_gbp"] == 0  # every reservation was settled or released
    assert scalar(db, "SELECT count(*) FROM user_events"
                      " WHERE event_type = 'cost_limit_reached'") == 1
    assert scalar(db, "SELECT count(*) FROM audit_log WHERE action = 'cost_limit.block'") == 1
    trip = db.execute("SELECT * FROM cost_limit_trips").fetchone()
    assert trip is not None and trip["notified_at"] is not None
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in sorted(names | {"w4"})}
    assert "".join(logs.values()).count('"event": "cost_limit_reached"') == 1  # once
    # Claimed items that met the limit say so; items still waiting were blocked with them.
    assert 1 <= "".join(logs.values()).count('"event": "item_blocked_by_cost_limit"') <= 15
    # The race happened: the five reservations were won by more than one process.
    reserved_by = {name: log.count('"event": "item_completed"') for name, log in logs.items()}
    assert sum(reserved_by.values()) == 5
    assert sum(1 for n in reserved_by.values() if n > 0) >= 2, reserved_by


def test_status_shows_blocked_organisations_with_spend_and_limit(
    db_url: str, db: Conn
) -> None:
    org = org_with_items(db, 3, "costly:0", limit="0.60")
    run_burst(db_url, concurrency=1)
    from .test_engine import cli

    result = cli("status", url=db_url)
    assert result.returncode == 0, result.stderr
    assert "over their daily cost limit" in result.stdout
    # Two due items and the completed project's next occurrence.
    assert f"{org['id']}  spent £0.50 of £0.60 today  (3 items blocked" in result.stdout


# -- the breaker's recovery ------------------------------------------------------------------


def _budget_pass(db_url: str, policy: str, now: datetime) -> Any:
    async def main() -> Any:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            loop = BudgetLoop(pool, BudgetConfig(policy=policy, default_limit=Decimal(50),
                                             reserve_per_item=Decimal("0.50"), interval=1.0))
            result = await loop.run_once(now=now)
            await Scheduler(pool, SchedulerConfig(interval=1.0)).run_once(now=now)
            return result
        finally:
            await pool.close()

    return asyncio.run(main())


def test_next_utc_day_resumes_blocked_items_under_policy_resume(db_url: str, db: Conn) -> None:
    org_with_items(db, 3, "costly:0", limit="0.50")
    reports = run_burst(db_url, concurrency=1)
    assert sorted(r.outcome for r in reports) == [Outcome.BLOCKED, Outcome.SUCCESS]
    assert _budget_pass(db_url, "resume", on_trip_day(db)).resumed == 0  # same day, no room
    # Blocked: the two items that met the limit and the completed project's next occurrence.
    result = _budget_pass(db_url, "resume", on_trip_day(db, days=1))
    assert result.resumed == 3
    due = db.execute("SELECT blocked_on FROM episode_schedule_queue WHERE status = 'pending'"
                     " AND run_after <= now()").fetchall()
    assert len(due) == 2 and all(r["blocked_on"] is None for r in due)
    later = db.execute("SELECT run_after, scheduled_for FROM episode_schedule_queue"
                       " WHERE status = 'pending' AND run_after > now()").fetchall()
    # Still claimable a lead window (MF_LEAD_SECONDS, 15 minutes) before its instant.
    assert len(later) == 1
    assert later[0]["run_after"] == later[0]["scheduled_for"] - timedelta(minutes=15)


def test_next_utc_day_skips_blocked_items_under_policy_skip(db_url: str, db: Conn) -> None:
    org = org_with_items(db, 3, "costly:0", limit="0.50")
    run_burst(db_url, concurrency=1)
    # The completed project's next occurrence was blocked too; make it one a week away.
    db.execute("UPDATE episode_schedule_queue SET scheduled_for = now() + interval '7 days'"
               " WHERE status = 'blocked' AND attempt_count = 0 AND scheduled_for > now()")
    result = _budget_pass(db_url, "skip", on_trip_day(db, days=1))
    assert (result.skipped, result.resumed) == (2, 1)  # the not-yet-due one just resumes
    cancelled = db.execute("SELECT project_id, last_error FROM episode_schedule_queue"
                           " WHERE status = 'cancelled'").fetchall()
    assert len(cancelled) == 2
    assert all(c["last_error"].startswith("skipped: daily cost limit reached on ")
               for c in cancelled)
    # The scheduler pass gave each skipped project its next regular occurrence.
    for c in cancelled:
        assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE project_id = %s"
                          " AND status = 'pending'", c["project_id"]) == 1
    # Nothing of the organisation is left blocked once the new day has been handled.
    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE status = 'blocked'"
                      " AND organization_id = %s", org["id"]) == 0


def test_raising_the_limit_releases_blocked_items_the_same_day(db_url: str, db: Conn) -> None:
    org = org_with_items(db, 3, "costly:0", limit="0.50")
    run_burst(db_url, concurrency=1)
    db.execute("UPDATE organizations SET daily_cost_limit_gbp = 10 WHERE id = %s", [org["id"]])
    assert _budget_pass(db_url, "resume", on_trip_day(db)).resumed == 3
    reports = run_burst(db_url, concurrency=2)
    assert [r.outcome for r in reports] == [Outcome.SUCCESS, Outcome.SUCCESS]


def test_reservation_is_released_after_a_failed_attempt_and_after_a_reaped_lease(
    db_url: str, db: Conn
) -> None:
    org = org_with_items(db, 1, "permanent", limit="5")
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.FAILED]
    assert scalar(db, "SELECT reserved_gbp FROM token_usage_daily WHERE organization_id = %s",
                  org["id"]) == 0

    # A worker that reserved and then vanished: the reaper's return releases the money.
    db.execute("UPDATE projects SET title = 'fine'")
    item = make_queue_item(db, make_project(db, make_user(db, org)))
    now = datetime.now(UTC)

    async def claim_reserve_and_reap() -> Decimal:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            async with pool.connection() as conn:
                claimed = await queue.claim_due_items(conn, worker="ghost", limit=1,
                                                      lease_seconds=0.5)
                assert [c.id for c in claimed] == [item["id"]]
                # A worker's prepare step: reserve the worst case and create the episode.
                prepared = await prepare_generations(
                    conn, claimed, now=now,
                    worst_case=lambda _request: Decimal("1.25"), default_limit=Decimal(50),
                )
                assert isinstance(prepared[0], Prepared), prepared
                cur = await conn.execute("SELECT reserved_gbp FROM token_usage_daily")
                held = (await cur.fetchone())["reserved_gbp"]  # type: ignore[index]
            async with pool.connection() as conn:
                await queue.reap_expired_leases(conn, max_attempts=3,
                                                now=datetime.now(UTC) + timedelta(seconds=5))
            return Decimal(held)
        finally:
            await pool.close()

    assert asyncio.run(claim_reserve_and_reap()) == Decimal("1.25")
    assert scalar(db, "SELECT reserved_gbp FROM token_usage_daily WHERE organization_id = %s",
                  org["id"]) == 0
    state = db.execute("SELECT status, reserved_cost_gbp FROM episode_schedule_queue"
                       " WHERE id = %s", [item["id"]]).fetchone()
    assert state == {"status": "pending", "reserved_cost_gbp": None}


def test_a_free_attempt_reserves_nothing_but_is_refused_once_the_day_is_over_the_limit(
    db_url: str, db: Conn
) -> None:
    """Worst case £0 (the template, a local model): no reservation to note or give back, so
    the organisation's aggregate row is not written; an organisation already over its limit
    (spend from elsewhere) still gets nothing generated."""
    under = org_with_items(db, 1, "free under", limit="1")
    over = org_with_items(db, 1, "free over", limit="1")
    now = datetime.now(UTC)  # the day of the spend below and of the reservations
    db.execute("INSERT INTO token_usage_daily (organization_id, date, total_cost_gbp)"
               " VALUES (%s, %s, 0.50), (%s, %s, 1.50)",
               [under["id"], now.date(), over["id"], now.date()])

    async def prepare_both() -> tuple[Mapping[str, object], list[dict[str, Any]]]:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            async with pool.connection() as conn:
                claimed = await queue.claim_due_items(conn, worker="w", limit=2,
                                                      lease_seconds=30)
                outcomes = await prepare_generations(
                    conn, claimed, now=now,
                    worst_case=lambda _request: Decimal(0), default_limit=Decimal(50),
                )
                cur = await conn.execute(
                    "SELECT q.organization_id, q.status, q.episode_id, q.reserved_cost_gbp,"
                    " q.reserved_on, d.reserved_gbp, d.xmin::text AS version"
                    " FROM episode_schedule_queue q JOIN token_usage_daily d"
                    " ON d.organization_id = q.organization_id ORDER BY d.total_cost_gbp")
                rows: list[dict[str, Any]] = await cur.fetchall()
        finally:
            await pool.close()
        by_org = {c.organization_id: o for c, o in zip(claimed, outcomes, strict=True)}
        return by_org, rows

    before = {r["organization_id"]: r["xmin"] for r in db.execute(
        "SELECT organization_id, xmin::text FROM token_usage_daily").fetchall()}
    by_org, rows = asyncio.run(prepare_both())
    assert isinstance(by_org[under["id"]], Prepared)
    refused = by_org[over["id"]]
    assert isinstance(refused, CostLimitReached)
    assert (refused.spent, refused.limit, refused.needed) == (
        Decimal("1.5"), Decimal(1), Decimal(0))
    granted, blocked = rows
    assert granted["organization_id"] == under["id"] and granted["episode_id"] is not None
    assert (granted["reserved_cost_gbp"], granted["reserved_on"]) == (None, None)
    assert blocked["episode_id"] is None  # a refusal writes nothing
    assert all(r["reserved_gbp"] == 0 for r in rows)
    # Neither aggregate row was written (a write would have a new row version).
    assert {r["organization_id"]: r["version"] for r in rows} == before


def test_reserve_answers_granted_limit_reached_or_lease_lost_for_a_pipelined_batch(
    db_url: str, db: Conn
) -> None:
    """cost.reserve sends; the answers are read after the batch's one transaction, which acts
    for each organisation in turn: granted (on the day, for the amount), refused by spend with
    what explains it, or the claim lost — and only the grant is written."""
    room = org_with_items(db, 1, "room", limit="1")
    spent = org_with_items(db, 1, "spent", limit="1")
    stolen = org_with_items(db, 1, "stolen", limit="1")
    now = datetime.now(UTC)
    db.execute("INSERT INTO token_usage_daily (organization_id, date, total_cost_gbp)"
               " VALUES (%s, %s, 0.90)", [spent["id"], now.date()])

    async def reserve_all() -> dict[str, cost.Reservation]:
        pool = await open_pool(settings_for(db_url), max_size=1)
        try:
            async with pool.connection() as conn:
                claimed = await queue.claim_due_items(conn, worker="w", limit=3,
                                                      lease_seconds=30)
                pending = {}
                async with conn.pipeline(), conn.transaction():
                    for item in sorted(claimed, key=lambda c: c.organization_id):
                        if item.organization_id == stolen["id"]:  # another claim's token
                            item = dataclasses.replace(item, token=item.token + 1000)
                        await act_for(conn, item.organization_id)
                        pending[item.organization_id] = await cost.reserve(
                            conn, item, amount=Decimal("0.5"), day=now.date(),
                            default_limit=Decimal(50), new_episode_id=None, sequence_number=1)
                return {org: await p.result() for org, p in pending.items()}
        finally:
            await pool.close()

    answers = asyncio.run(reserve_all())
    assert answers[room["id"]] == cost.Granted(now.date(), Decimal("0.5"), None)
    refused = answers[spent["id"]]
    assert isinstance(refused, CostLimitReached) and not refused.by_reservations
    assert (refused.spent, refused.limit, refused.needed) == (
        Decimal("0.9"), Decimal(1), Decimal("0.5"))
    assert isinstance(answers[stolen["id"]], cost.LeaseLost)
    reserved = {r["organization_id"]: r["reserved_gbp"] for r in db.execute(
        "SELECT organization_id, reserved_gbp FROM token_usage_daily").fetchall()}
    assert reserved == {room["id"]: Decimal("0.5"), spent["id"]: 0}


# -- notifiers -------------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    failures_left = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Hook.failures_left > 0:
            _Hook.failures_left -= 1
            self.send_response(500)
            self.end_headers()
            return
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.received, _Hook.failures_left = [], 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/cost"
    server.shutdown()
    server.server_close()


def test_webhook_notifies_once_per_org_per_day_and_retries_a_500(
    db_url: str, db: Conn, webhook: str
) -> None:
    org = org_with_items(db, 4, "costly:0", limit="0.50")
    before = datetime.now(UTC)
    run_burst(db_url, concurrency=1, notifier="webhook", notify_webhook_url=webhook)
    # The same day, again: more items blocked, no second notification.
    db.execute("UPDATE episode_schedule_queue SET status = 'pending', blocked_on = NULL"
               " WHERE status = 'blocked'")
    run_burst(db_url, concurrency=1, notifier="webhook", notify_webhook_url=webhook)
    assert len(_Hook.received) == 1, "one notification per org per day, after one 500"
    note = _Hook.received[0]
    assert note["event"] == "cost_limit_reached" and note["organization_id"] == org["id"]
    assert note["limit_gbp"] == "0.5000" and note["spent_gbp"] == "0.500000"
    after = datetime.now(UTC)
    assert note["date"] in {before.date().isoformat(), after.date().isoformat()}


def test_webhook_gives_up_after_its_attempts_and_notifier_specs_are_checked(
    webhook: str,
) -> None:
    _Hook.failures_left = 10
    notifier = WebhookNotifier(webhook, attempts=3, backoff=0.01)
    trip = Trip("org_x", datetime.now(UTC).date(), Decimal(1), Decimal(1), 3,
                "Daily limit exceeded")
    with pytest.raises(Exception, match="webhook answered 500"):
        asyncio.run(notifier.notify(trip))
    assert _Hook.failures_left == 7
    with pytest.raises(PluginLoadError, match="needs MF_NOTIFY_WEBHOOK_URL"):
        load_notifier("webhook", None)
    with pytest.raises(PluginLoadError, match="notifier 'nope:x'"):
        load_notifier("nope:x", None)
