"""Where two of one day's merged changes meet (#23, #24, #25, #27, #28): the final write's
project-at-commit paths with per-call booking and the aggregate written at commit, the
console's actions with the planning rules, and the claim loop's flow give-back with liveness.

Real PostgreSQL and the real engine, as the tests of each change."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import psycopg.rows
import pytest

from mf_worker.engine.worker import Outcome
from mf_worker.generation import GenerationRequest, GenerationResult, TokenUsage
from mf_worker.generators.template import TemplateGenerator

from .factories import make_queue_item, make_tenant
from .test_console import console_role_url  # noqa: F401  (a fixture of its own module)
from .test_planning import DAILY, ChangesTheProject
from .workers import run_burst

Conn = psycopg.Connection[dict[str, Any]]


class TwoCallsThenChange:
    """Writes the template episode in two provider calls (a draft and a repair, each answered
    with half the usage), running ``sql`` on the project in between (the web app deleting or
    pausing it while the LLM writes)."""

    def __init__(self, db_url: str, sql: str | None) -> None:
        self.db_url, self.sql = db_url, sql
        self.template = TemplateGenerator()

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        return self.template.estimate_max_usage(request)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        import asyncio
        import dataclasses

        result = self.template.write(request)
        [whole] = result.usages
        half = TokenUsage(whole.model, whole.prompt_tokens // 2, whole.completion_tokens // 2)
        assert request.calls is not None
        async with request.calls.call("draft", max_usage=whole) as call:
            call.answered(half)
        if self.sql is not None:
            sql = self.sql

            def change() -> None:
                with psycopg.connect(self.db_url, autocommit=True) as conn:
                    conn.execute(sql.encode(), [request.project.id])

            await asyncio.to_thread(change)
        async with request.calls.call("repair", max_usage=whole) as call:
            call.answered(half)
        return dataclasses.replace(result, usage=(half, half))


def _daily(db: Conn, org_id: str) -> dict[str, Any]:
    row = db.execute("SELECT * FROM token_usage_daily WHERE organization_id = %s",
                     [org_id]).fetchone()
    assert row is not None
    return row


def test_a_deleted_projects_cancel_books_its_usage_once_and_releases_its_reservation(
    db_url: str, db: Conn
) -> None:
    """Deleted while generated: the usage the generator reported is booked once, the
    reservation the prepare took is given back at commit (nothing left reserved, no estimate),
    and the day's total is exactly the booked rows."""
    t = make_tenant(db, cadence=DAILY)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC))
    gen = ChangesTheProject(db_url, "DELETE FROM projects WHERE id = %s")
    [report] = run_burst(db_url, gen)
    assert report.outcome is Outcome.CANCELLED, (report.outcome, report.error)
    assert report.reserved_gbp > 0
    usage = db.execute("SELECT * FROM token_usage WHERE organization_id = %s",
                       [t["org"]["id"]]).fetchall()
    assert [u["estimated"] for u in usage] == [False]
    daily = _daily(db, t["org"]["id"])
    assert daily["reserved_gbp"] == Decimal(0)
    assert daily["total_cost_gbp"] == sum(u["cost_gbp"] for u in usage)
    assert daily["estimated_cost_gbp"] == Decimal(0)
    row = db.execute("SELECT reserved_cost_gbp FROM episode_schedule_queue WHERE id = %s",
                     [item["id"]]).fetchone()
    assert row is not None and row["reserved_cost_gbp"] is None


def test_the_console_role_reaches_no_address_of_any_organisation(db_url: str, db: Conn) -> None:
    """#25 promised that only the mail role reads addresses; #27 added a cross-organisation
    role for the console. Made by the same roles file (mail role too), the console role reads
    every relation and calls every function it may, acting for no organisation and for each,
    and finds no user's address."""
    import subprocess
    import uuid

    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from .conftest import ROLES_SQL, ensure_cross_org_role, require_binary
    from .test_tenancy import addresses_reachable, organisations_with_addresses, trip_today

    suffix = uuid.uuid4().hex[:10]
    names = {kind: f"mf_test_{kind}_{suffix}" for kind in ("worker", "mail", "console")}
    ensure_cross_org_role(db)
    applied = subprocess.run(
        [require_binary("psql"), db_url,
         *[arg for kind, name in names.items()
           for arg in ("-v", f"{kind}_role={name}", "-v", f"{kind}_password='x'")],
         "-f", str(ROLES_SQL)], capture_output=True, text=True, timeout=60, check=False)
    assert applied.returncode == 0, applied.stderr
    try:
        orgs = organisations_with_addresses(db, 2)
        trip_today(db, orgs[0][0])
        db.execute("ANALYZE users")
        tokens = [a for _, addresses in orgs for a in addresses]
        tokens += [a.split("@")[0] for a in tokens]
        url = make_conninfo("", **{**conninfo_to_dict(db_url), "user": names["console"]})
        with psycopg.connect(url, autocommit=True,
                             row_factory=psycopg.rows.dict_row) as conn:
            found, relations, _ = addresses_reachable(conn, [o for o, _ in orgs], tokens)
        assert {"users", "projects", "audit_log"} <= set(relations)
        assert found == set(), f"the console role reads addresses: {sorted(found)}"
    finally:
        for role in names.values():
            db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                       " WHERE usename = %s", [role])
            db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_deleted_projects_two_calls_are_booked_once_each_and_count_one_episode(
    db_url: str, db: Conn
) -> None:
    """Deleted between its draft and its repair (#24: cancelled, its usage booked; #23: call by
    call; #28: the aggregate at commit): each call booked once, nothing estimated, nothing left
    reserved, and the day counts the attempt as one episode at most, not one per call."""
    t = make_tenant(db, cadence=DAILY)
    make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC))
    [report] = run_burst(db_url, TwoCallsThenChange(db_url, "DELETE FROM projects WHERE id = %s"))
    assert report.outcome is Outcome.CANCELLED, (report.outcome, report.error)
    usage = db.execute("SELECT * FROM token_usage").fetchall()
    assert [u["estimated"] for u in usage] == [False, False]
    daily = _daily(db, t["org"]["id"])
    assert (daily["reserved_gbp"], daily["estimated_cost_gbp"]) == (0, 0)
    assert daily["total_cost_gbp"] == sum(u["cost_gbp"] for u in usage)
    assert daily["total_tokens"] == sum(u["total_tokens"] for u in usage)
    assert daily["episode_count"] <= 1


def test_a_paused_projects_two_calls_are_booked_and_count_one_episode(
    db_url: str, db: Conn
) -> None:
    """Paused between its draft and its repair: the episode is withdrawn, both calls booked
    once, the reservation given back, one episode counted."""
    t = make_tenant(db, cadence=DAILY)
    make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC))
    [report] = run_burst(db_url, TwoCallsThenChange(
        db_url, "UPDATE projects SET status = 'paused' WHERE id = %s"))
    assert report.outcome is Outcome.SUCCESS, (report.outcome, report.error)
    assert report.delivery is not None and report.delivery.withdrawn_reason == "project paused"
    usage = db.execute("SELECT * FROM token_usage").fetchall()
    assert [u["estimated"] for u in usage] == [False, False]
    daily = _daily(db, t["org"]["id"])
    assert (daily["reserved_gbp"], daily["estimated_cost_gbp"]) == (0, 0)
    assert daily["total_cost_gbp"] == sum(u["cost_gbp"] for u in usage)
    assert daily["episode_count"] == 1


def test_an_item_cancelled_by_an_operator_before_its_prepare_gives_its_request_back(
    db_url: str, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#23/#24.1: the claim loop takes one provider request per item it claims, and an item that
    ends before any call hands it back. #27: an operator cancels a processing item from the
    console (the same transition as `mf-worker cancel`). Cancelled between the claim and the
    prepare, the item's prepare finds its claim gone (LeaseLost): its request must go back to
    the key's bucket like any item that made no call."""
    import asyncio

    from mf_worker import queue
    from mf_worker.daemon import build, shutdown
    from mf_worker.engine.worker import InFlight
    from mf_worker.generation import load_generator
    from mf_worker.status import cancel_queue_item

    from .conftest import settings_for
    from .provider import ProviderServer
    from .workers import llm_settings

    make_queue_item(db, make_tenant(db)["project"])
    with ProviderServer(lifetime=60) as server:
        for name in ("MF_LLM_API_KEY", "MF_LLM_API_KEY_FILE", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MF_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("MF_LLM_MODEL", "gpt-4o-mini")
        monkeypatch.setenv("MF_LLM_REQUESTS_PER_MINUTE", "60")
        settings = settings_for(db_url, llm_requests_per_minute=60.0)

        def level() -> float:
            row = db.execute("SELECT request_level FROM provider_limits").fetchone()
            assert row is not None and row["request_level"] is not None
            return float(row["request_level"])

        async def main() -> tuple[Outcome, float]:
            components = await build(settings, generator=load_generator("openai", llm_settings()),
                                     scheduler=False)
            worker = components.worker
            try:
                assert worker.flow.enabled
                admitted, _ = await worker.flow.admit(1, in_use=0)
                assert admitted == 1
                after_admit = level()
                async with components.pool.connection() as conn:
                    [item] = await queue.claim_due_items(
                        conn, worker=worker.worker_id, limit=1,
                        lease_seconds=settings.lease_seconds)
                    await cancel_queue_item(conn, item.id, "support ticket 7", actor="ops")
                outcome = await worker.process(InFlight(item=item, admitted=True))
                return outcome, after_admit
            finally:
                await shutdown(components)

        outcome, after_admit = asyncio.run(main())
    assert outcome is Outcome.LEASE_LOST
    assert level() == pytest.approx(after_admit + 1)


def test_the_console_role_cancels_a_processing_item_with_its_reservation_settled_at_commit(
    console_role_url: str, db: Conn,  # noqa: F811  (the fixture imported above)
) -> None:
    """#27's console cancels a processing item as its least-privilege role; #28 moved the
    reservation's release and the estimate's aggregation to deferred triggers that run at that
    commit, as that role. The worst case is booked as an estimate once, the day's reservation
    given back, the slot skipped (#24), and the audit row written."""
    import asyncio

    from mf_worker.db import connect
    from mf_worker.status import cancel_queue_item

    from .conftest import settings_for

    t = make_tenant(db)
    day = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()
    assert day is not None
    item = make_queue_item(db, t["project"], status="processing", locked_by="w:1",
                           lease_expires_at=datetime.now(UTC), claim_token=1,
                           reserved_cost_gbp=Decimal("0.5"), reserved_on=day["d"])
    db.execute("INSERT INTO token_usage_daily (organization_id, date, reserved_gbp)"
               " VALUES (%s, %s, 0.5)", [t["org"]["id"], day["d"]])

    async def cancel() -> None:
        conn = await connect(settings_for(console_role_url))
        try:
            await cancel_queue_item(conn, item["id"], "support ticket 9", actor="ana (console)")
        finally:
            await conn.close()

    asyncio.run(cancel())
    done = db.execute("SELECT * FROM episode_schedule_queue WHERE id = %s",
                      [item["id"]]).fetchone()
    assert done is not None
    assert (done["status"], done["reserved_cost_gbp"], done["metadata"]["skipped"]) == (
        "cancelled", None, True)
    daily = _daily(db, t["org"]["id"])
    assert (daily["reserved_gbp"], daily["estimated_cost_gbp"], daily["total_cost_gbp"]) == (
        0, Decimal("0.5"), Decimal("0.5"))
    assert [r["action"] for r in db.execute("SELECT action FROM audit_log")] == [
        "queue_item.cancel"]


def test_an_item_handed_back_by_a_drain_while_preparing_gives_its_request_back(
    db_url: str, db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#24.1: an item that ends before any call hands its provider request back; #24's
    shutdown drains in-flight items. One still preparing when the grace ends (its row held by
    someone else) is handed back to the queue whole, and its request to the key's bucket."""
    import asyncio
    import threading

    from mf_worker import queue
    from mf_worker.daemon import build, shutdown
    from mf_worker.generation import load_generator

    from .conftest import settings_for
    from .provider import ProviderServer
    from .workers import llm_settings

    made = make_queue_item(db, make_tenant(db)["project"])
    with ProviderServer(lifetime=60) as server:
        for name in ("MF_LLM_API_KEY", "MF_LLM_API_KEY_FILE", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MF_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("MF_LLM_MODEL", "gpt-4o-mini")
        monkeypatch.setenv("MF_LLM_REQUESTS_PER_MINUTE", "60")
        settings = settings_for(db_url, llm_requests_per_minute=60.0, db_lock_timeout=20.0)
        held, release = threading.Event(), threading.Event()

        def hold_the_row() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
                conn.execute("SELECT 1 FROM episode_schedule_queue WHERE id = %s FOR UPDATE",
                             [made["id"]])
                held.set()
                release.wait(30)

        def level() -> float:
            row = db.execute("SELECT request_level FROM provider_limits").fetchone()
            assert row is not None and row["request_level"] is not None
            return float(row["request_level"])

        async def main() -> tuple[int, float]:
            components = await build(settings, generator=load_generator("openai", llm_settings()),
                                     scheduler=False)
            worker = components.worker
            holder = threading.Thread(target=hold_the_row)
            try:
                admitted, _ = await worker.flow.admit(1, in_use=0)
                assert admitted == 1
                after_admit = level()
                async with components.pool.connection() as conn:
                    [item] = await queue.claim_due_items(
                        conn, worker=worker.worker_id, limit=1,
                        lease_seconds=settings.lease_seconds)
                holder.start()
                held.wait(10)
                worker._start(item, admitted=True)
                await asyncio.sleep(0.5)  # the prepare waits for the row
                worker.stop()
                asyncio.get_running_loop().call_later(1.0, release.set)
                released = await worker.drain(0.2)
                return released, after_admit
            finally:
                release.set()
                holder.join()
                await shutdown(components)

        released, after_admit = asyncio.run(main())
    assert released == 1
    row = db.execute("SELECT status, attempt_count FROM episode_schedule_queue").fetchone()
    assert row == {"status": "pending", "attempt_count": 0}
    assert level() == pytest.approx(after_admit + 1)
