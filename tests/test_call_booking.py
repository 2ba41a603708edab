"""Money booked exactly (#23) and a failed claim that stops nothing (#24): every provider call an
attempt makes is booked by what the provider did with it, the request bucket counts calls, an
exhausted quota is notified once per exhaustion, and a worker whose claim fails claims again.

Real PostgreSQL, the real engine with the `openai` generator, and `tests.provider.ProviderServer`
(a real HTTP server on loopback that answers like a hosted provider: 503 outages, calls that
answer too late, 429s, an exhausted quota, replies that are not JSON).

The table of which call ends how, what it books and which test shows it is in
docs/operations.md, "The daily cost limit".
"""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from mf_worker.engine.worker import AttemptReport, Outcome

from .factories import make_queue_item, make_tenant
from .provider import ProviderServer
from .workers import run_burst, run_single, start_worker, wait_until

Conn = psycopg.Connection[dict[str, Any]]
MODEL = "gpt-4o-mini"  # priced in the shipped table: small costs, not zero
OPENAI = "openai"


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProviderServer]:
    """A provider with no rate limit, and the MF_LLM_* variables pointing at it."""
    with ProviderServer(lifetime=240) as server:
        for name in ("MF_LLM_API_KEY", "MF_LLM_API_KEY_FILE", "CREDENTIALS_DIRECTORY",
                     "MF_LLM_MAX_TOKENS", "MF_LLM_TEMPERATURE", "MF_LLM_REQUESTS_PER_MINUTE",
                     "MF_LLM_TOKENS_PER_MINUTE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MF_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("MF_LLM_MODEL", MODEL)
        monkeypatch.setenv("MF_LLM_TIMEOUT", "10")
        yield server


def statuses(db: Conn) -> dict[str, int]:
    return {r["status"]: r["n"] for r in db.execute(
        "SELECT status, count(*) AS n FROM episode_schedule_queue"
        " WHERE scheduled_for <= now() GROUP BY status")}


def booked(db: Conn) -> list[dict[str, Any]]:
    """The usage rows, answered before estimated: one statement books an attempt's rows at
    one instant, and ids drawn in the same millisecond do not keep their order."""
    return db.execute("SELECT model, prompt_tokens, completion_tokens, cost_gbp, estimated"
                      " FROM token_usage ORDER BY created_at, estimated, id").fetchall()


def day_totals(db: Conn) -> dict[str, Decimal]:
    row = db.execute("SELECT coalesce(sum(total_cost_gbp), 0) AS total,"
                     " coalesce(sum(estimated_cost_gbp), 0) AS estimated,"
                     " coalesce(sum(reserved_gbp), 0) AS reserved FROM token_usage_daily"
                     ).fetchone()
    assert row is not None
    return dict(row)


def run_until_completed(db_url: str, db: Conn, count: int, timeout: float, **overrides: Any
                        ) -> list[AttemptReport]:
    """Bursts of the in-process worker until ``count`` items completed (retries back off, so
    a burst ends while items wait for their next try)."""
    reports: list[AttemptReport] = []
    deadline = time.monotonic() + timeout
    while statuses(db).get("completed", 0) < count and time.monotonic() < deadline:
        reports += run_burst(db_url, OPENAI, **overrides)
        assert statuses(db).get("failed", 0) == 0, booked(db)
        time.sleep(0.2)
    assert statuses(db) == {"completed": count}
    return reports


def test_an_outage_of_503s_books_nothing_but_the_usage_of_the_calls_that_ran(
    db_url: str, db: Conn, provider: ProviderServer
) -> None:
    """The issue's 20-second run of 503s: the provider ran none of the refused calls, so none
    is booked (before: each booked the attempt's worst case as an estimate, 14.5x the bill);
    what is booked is exactly the usage of the calls it answered."""
    for _ in range(4):
        make_queue_item(db, make_tenant(db)["project"])
    provider.outage(20.0)
    run_until_completed(db_url, db, 4, timeout=120)
    counts = provider.counts()
    assert counts["unavailable"] >= 4  # the outage really happened
    rows = booked(db)
    assert [r for r in rows if r["estimated"]] == []
    assert len(rows) == counts["accepted"] == 4
    totals = day_totals(db)
    assert totals["estimated"] == 0 and totals["reserved"] == 0
    assert totals["total"] == sum(r["cost_gbp"] for r in rows) > 0


def test_an_outage_of_timeouts_books_estimates_only_for_the_calls_that_timed_out(
    db_url: str, db: Conn, provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls the provider ran but answered after MF_LLM_TIMEOUT: nobody can know what they
    cost, so each is booked at its own worst case (the draft's, not the whole attempt's
    reservation, which also covers a repair), marked estimated; the calls that answered are
    booked at their usage, and nothing else is booked."""
    monkeypatch.setenv("MF_LLM_TIMEOUT", "0.5")
    for _ in range(3):
        make_queue_item(db, make_tenant(db)["project"])
    provider.outage(3.0, hang=1.5)
    reports = run_until_completed(db_url, db, 3, timeout=120)
    counts, hung = provider.counts(), provider.hung
    assert hung >= 3
    rows = booked(db)
    estimates = [r for r in rows if r["estimated"]]
    assert len(estimates) == hung
    assert len(rows) - len(estimates) == counts["accepted"] - hung == 3
    reserved = {r.reserved_gbp for r in reports if r.outcome is Outcome.RETRY}
    assert len({r["cost_gbp"] for r in estimates}) == 1  # the same prompt: the same bound
    assert 0 < estimates[0]["cost_gbp"] < min(reserved)
    assert day_totals(db)["estimated"] == sum(r["cost_gbp"] for r in estimates)


@pytest.mark.parametrize("fault", ["rate_limited", "quota"])
def test_a_billed_draft_is_booked_when_the_repair_is_refused(
    db_url: str, db: Conn, provider: ProviderServer, fault: str
) -> None:
    """The draft is answered (billed) but is not JSON; the repair call meets a 429 or an
    exhausted quota. The item is deferred without using an attempt, and the draft's usage is
    booked (before: the reservation was released unbooked, so billed drafts went through
    against the limit without ever counting); the refused repair books nothing."""
    item = make_queue_item(db, make_tenant(db)["project"])
    provider.broken_drafts, provider.repair_fault = True, fault
    assert run_single(db_url, item["id"], generator=OPENAI) is Outcome.DEFERRED
    rows = booked(db)
    assert len(rows) == 1
    assert (rows[0]["model"], rows[0]["completion_tokens"], rows[0]["estimated"]) == (
        MODEL, 60, False)
    assert day_totals(db)["total"] == rows[0]["cost_gbp"] > 0
    state = db.execute("SELECT status, attempt_count FROM episode_schedule_queue").fetchone()
    assert state == {"status": "pending", "attempt_count": 0}


def test_a_repair_that_times_out_books_the_draft_and_the_repairs_worst_case(
    db_url: str, db: Conn, provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The draft is answered but unusable; the repair is sent and answered too late. The
    provider probably ran the repair: the draft's usage and the repair's own worst case
    (estimated) are booked (before: only the draft)."""
    monkeypatch.setenv("MF_LLM_TIMEOUT", "0.5")
    item = make_queue_item(db, make_tenant(db)["project"])
    provider.broken_drafts, provider.repair_fault, provider.hang_seconds = True, "hang", 1.5
    assert run_single(db_url, item["id"], generator=OPENAI) is Outcome.RETRY
    rows = booked(db)
    assert [(r["model"], r["estimated"]) for r in rows] == [(MODEL, False), ("estimate", True)]
    assert rows[1]["cost_gbp"] > rows[0]["cost_gbp"] > 0  # the bound covers the longer prompt
    totals = day_totals(db)
    assert totals["estimated"] == rows[1]["cost_gbp"] and totals["reserved"] == 0


def test_a_refused_connection_books_nothing(
    db_url: str, db: Conn, provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the provider's address: the request was never sent, so the attempt
    (a transient failure, retried later) books nothing (before: the whole reservation)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MF_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    item = make_queue_item(db, make_tenant(db)["project"])
    assert run_single(db_url, item["id"], generator=OPENAI) is Outcome.RETRY
    assert booked(db) == []
    assert day_totals(db)["reserved"] == 0


def test_the_request_bucket_is_charged_for_every_call_a_repair_included(
    db_url: str, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120 requests a minute at the provider, every item needs a repair (two calls). Charged
    per item, the fleet sent twice its pace and drew 429s; charged per call (the repair takes
    a request of its own), it draws none."""
    with ProviderServer(requests_per_minute=120, burst_seconds=3, lifetime=120) as server:
        server.broken_drafts = True
        monkeypatch.setenv("MF_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("MF_LLM_MODEL", MODEL)
        monkeypatch.setenv("MF_LLM_TIMEOUT", "10")
        for _ in range(8):
            make_queue_item(db, make_tenant(db)["project"])
        reports = run_burst(db_url, OPENAI, concurrency=4, llm_requests_per_minute=120.0)
        counts = server.counts()
    assert [r.outcome for r in reports] == [Outcome.SUCCESS] * 8
    assert counts["accepted"] == 16 and counts["rate_limited"] == 0


def test_an_exhausted_quota_is_notified_once_per_exhaustion(
    db_url: str, db: Conn, provider: ProviderServer, captured_logs: io.StringIO
) -> None:
    """Each 10-minute pause of one exhaustion used to notify again (144 a day per key). Now a
    pause that follows another of the same exhaustion is quiet; after calls under the key
    succeeded again, the next exhaustion is a new one and is notified."""
    items = [make_queue_item(db, make_tenant(db)["project"]) for _ in range(4)]

    def pause_ends() -> None:
        db.execute("UPDATE provider_limits SET cooldown_until = now() - interval '1 s',"
                   " refilled_at = now() - interval '1 s' WHERE cooldown_until IS NOT NULL")

    def notices() -> int:
        return sum('"provider_quota_exhausted"' in line
                   for line in captured_logs.getvalue().splitlines())

    provider.exhaust_quota()
    assert run_single(db_url, items[0]["id"], generator=OPENAI) is Outcome.DEFERRED
    assert notices() == 1
    pause_ends()  # the probe after the pause finds the quota still used up
    assert run_single(db_url, items[1]["id"], generator=OPENAI) is Outcome.DEFERRED
    assert notices() == 1
    provider.exhaust_quota(False)  # topped up: a call succeeds
    pause_ends()
    assert run_single(db_url, items[2]["id"], generator=OPENAI) is Outcome.SUCCESS
    provider.exhaust_quota()  # a new exhaustion
    assert run_single(db_url, items[3]["id"], generator=OPENAI) is Outcome.DEFERRED
    assert notices() == 2


def test_a_worker_claims_again_after_its_claims_failed_on_a_locked_queue(
    db_url: str, db: Conn, provider: ProviderServer, tmp_path: Path
) -> None:
    """#24: the queue table locked (8 s) for longer than MF_DB_LOCK_TIMEOUT (1 s) while a
    worker with the `openai` generator runs: its claims fail. Before, each failed claim kept
    the flow-control slots it had been admitted, and after two the worker never claimed again
    (alive, healthy, idle, items pending). Now the slots are the items it holds: it claims the
    items that fell due during the lock as soon as the lock is gone."""
    log = tmp_path / "w.log"
    make_queue_item(db, make_tenant(db)["project"])
    worker = start_worker(db_url, log=log, MF_GENERATOR=OPENAI, MF_LLM_BASE_URL=provider.base_url,
                          MF_LLM_MODEL=MODEL, MF_LLM_TIMEOUT="10", MF_CONCURRENCY="2",
                          MF_DB_LOCK_TIMEOUT="1", MF_POLL_INTERVAL="0.5")
    try:
        wait_until(lambda: statuses(db) == {"completed": 1}, 60, "the first item")
        locked = threading.Event()

        def hold_the_lock() -> None:
            with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn, \
                    conn.transaction():
                conn.execute("LOCK TABLE episode_schedule_queue IN ACCESS EXCLUSIVE MODE")
                tenants = [make_tenant(conn) for _ in range(3)]
                for tenant in tenants:
                    make_queue_item(conn, tenant["project"])
                locked.set()
                time.sleep(8)

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        locked.wait(30)
        wait_until(lambda: log.read_text().count('"claim_failed"') >= 2, 30,
                   "two claims to fail on the lock")
        holder.join()
        wait_until(lambda: statuses(db).get("completed", 0) == 4, 60,
                   "the items that fell due during the lock to complete")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert worker.returncode == 0
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert not [x for x in lines if x.get("event") == "item_crashed"]
