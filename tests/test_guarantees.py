"""Guarantees under races: the claim token fences every transition, a worker never hurts its own
healthy attempts, one locked row stalls nothing, no episode is left generating, a retried prepare
is idempotent, and the definer functions cannot be hijacked.

Each test reproduces a case that was found broken (issue #12), with real processes' tools: a
real PostgreSQL, real row and advisory locks, the real worker, heartbeat, reaper and scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row

from mf_worker import queue
from mf_worker.daemon import Components, build, shutdown
from mf_worker.db import connect, open_pool
from mf_worker.engine.prepare import Prepared, prepare_generations
from mf_worker.engine.worker import AttemptReport, Outcome
from mf_worker.generation import GenerationRequest, GenerationResult
from mf_worker.generators.template import TemplateGenerator
from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop
from mf_worker.maintenance.heartbeat import Heartbeat
from mf_worker.maintenance.reaper import Reaper, ReaperConfig
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.scheduling.scheduler import enqueue_item
from mf_worker.status import cancel_queue_item, retry_queue_item

from .conftest import settings_for
from .factories import make_episode, make_queue_item, make_tenant, one
from .workers import run_burst

Conn = psycopg.Connection[dict[str, Any]]


# -- an engine in this process, driven step by step ---------------------------------------------


class Gated:
    """A generator whose every call waits until the test opens that call's gate; the episode's
    title says which call wrote it. A fake that really behaves, not a mock."""

    def __init__(self) -> None:
        self.calls: list[tuple[GenerationRequest, asyncio.Event]] = []
        self._arrived = asyncio.Condition()
        self._template = TemplateGenerator()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        gate = asyncio.Event()
        async with self._arrived:
            self.calls.append((request, gate))
            number = len(self.calls)
            self._arrived.notify_all()
        await gate.wait()
        return dataclasses.replace(self._template.write(request), title=f"call {number}")

    async def started(self, count: int) -> None:
        """Wait (up to 30 s) until ``count`` calls have started."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.calls) >= count), 30)

    def open(self, number: int) -> None:
        self.calls[number - 1][1].set()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait (up to 30 s: a liveness bound, not a timing assertion) until ``predicate`` holds."""
    deadline = asyncio.get_running_loop().time() + 30
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run_engine(
    db_url: str, gen: Gated, scenario: Callable[[Components, list[AttemptReport]], Awaitable[None]],
    **overrides: Any,
) -> list[AttemptReport]:
    """Start a worker (claim loop only: the test runs the heartbeat and reaper itself), play
    ``scenario``, then stop it and hand back what remains."""
    reports: list[AttemptReport] = []
    settings = settings_for(db_url, **{"poll_interval": 0.05, "concurrency": 4, **overrides})

    async def main() -> None:
        components = await build(settings, generator=gen, observers=[reports.append],
                                 scheduler=False)
        claim_loop = asyncio.create_task(components.worker.run())
        try:
            await scenario(components, reports)
        finally:
            for _, gate in gen.calls:
                gate.set()
            components.worker.stop()
            await claim_loop
            await components.worker.drain(5)
            await shutdown(components)

    asyncio.run(main())
    return reports


def test_cancel_then_retry_mid_generation_fences_out_the_cancelled_generation(
    db_url: str, db: Conn
) -> None:
    """Case 2: `cancel` then `retry` while attempt 1 generates; the same worker claims the item
    again. The cancelled generation's write must be refused; the new claim's becomes the
    episode."""
    t = make_tenant(db)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))
    gen = Gated()

    async def scenario(c: Components, reports: list[AttemptReport]) -> None:
        await gen.started(1)
        conn = await connect(c.settings)
        async with conn:
            await cancel_queue_item(conn, item["id"], "operator changed their mind",
                                    actor="test")
            await retry_queue_item(conn, item["id"], actor="test")
        c.worker.wake.set()
        await gen.started(2)  # the same worker, the same item, attempt 1 again
        gen.open(1)
        await eventually(lambda: len(reports) == 1, "the cancelled generation's outcome")
        assert reports[0].outcome is Outcome.LEASE_LOST
        assert one(db, "SELECT status FROM episode_schedule_queue WHERE id = %s",
                   item["id"])["status"] == "processing"
        gen.open(2)
        await eventually(lambda: len(reports) == 2, "the retried generation's outcome")

    reports = run_engine(db_url, gen, scenario)
    assert [r.outcome for r in reports] == [Outcome.LEASE_LOST, Outcome.SUCCESS]
    done = one(db, "SELECT status, episode_id FROM episode_schedule_queue WHERE id = %s",
               item["id"])
    assert done["status"] == "completed"
    episode = one(db, "SELECT title, status FROM episodes WHERE id = %s", done["episode_id"])
    assert episode == {"title": "call 2", "status": "ready"}


def test_a_reclaimed_item_keeps_its_in_flight_entry_when_the_old_attempt_ends(
    db_url: str, db: Conn
) -> None:
    """Case 3: after a heartbeat gap longer than the lease, the reaper returns the item and the
    same worker claims it again. When the old attempt's task ends it must remove only its own
    entry: the new attempt stays in flight, and the heartbeat keeps its lease."""
    t = make_tenant(db)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))
    gen = Gated()

    async def scenario(c: Components, reports: list[AttemptReport]) -> None:
        await gen.started(1)
        db.execute("UPDATE episode_schedule_queue SET lease_expires_at = now() - interval '1 s'"
                   " WHERE id = %s", [item["id"]])
        reaper = Reaper(c.pool, ReaperConfig(lease_seconds=c.settings.lease_seconds,
                                             max_attempts=3))
        assert [r.id for r in await reaper.run_once()] == [item["id"]]
        c.worker.wake.set()
        await gen.started(2)
        gen.open(1)
        await eventually(lambda: len(reports) == 1, "the old attempt's outcome")
        assert reports[0].outcome is Outcome.LEASE_LOST
        assert len(c.worker.in_flight) == 1, "the new attempt lost its in-flight entry"
        before = one(db, "SELECT lease_expires_at FROM episode_schedule_queue WHERE id = %s",
                     item["id"])["lease_expires_at"]
        assert await Heartbeat(c.worker).run_once() == set()
        after = one(db, "SELECT lease_expires_at FROM episode_schedule_queue WHERE id = %s",
                    item["id"])["lease_expires_at"]
        assert after > before
        gen.open(2)
        await eventually(lambda: len(reports) == 2, "the new attempt's outcome")

    reports = run_engine(db_url, gen, scenario)
    assert [r.outcome for r in reports] == [Outcome.LEASE_LOST, Outcome.SUCCESS]
    assert one(db, "SELECT title FROM episodes")["title"] == "call 2"


def test_a_heartbeat_that_started_before_a_reclaim_does_not_abandon_the_new_attempt(
    db_url: str, db: Conn
) -> None:
    """Case 4: the heartbeat takes its list of items, then its statement is held up (here by a
    test-only trigger that waits on an advisory lock) while the item is reaped and the same
    worker claims it again. What the heartbeat then finds lost is the old attempt, not the new
    one, which must go on and complete."""
    t = make_tenant(db)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))
    # Stalls only the heartbeat's statement (it alone sets lease_expires_at first), before it
    # touches any row, for as long as the test holds advisory lock 4242.
    db.execute("""
        CREATE FUNCTION test_stall_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_query() ~ 'SET\\s+lease_expires_at' THEN
                PERFORM pg_advisory_xact_lock_shared(4242);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_stall_heartbeat BEFORE UPDATE ON episode_schedule_queue
            FOR EACH STATEMENT EXECUTE FUNCTION test_stall_heartbeat();
    """)
    gen = Gated()

    async def scenario(c: Components, reports: list[AttemptReport]) -> None:
        await gen.started(1)
        stall = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        async with stall:
            await stall.execute("BEGIN")
            await stall.execute("SELECT pg_advisory_xact_lock(4242)")
            beat = asyncio.create_task(Heartbeat(c.worker).run_once())

            def heartbeat_waiting() -> bool:
                waiting: int = one(db, "SELECT count(*) AS n FROM pg_locks"
                                       " WHERE locktype = 'advisory' AND objid = 4242"
                                       " AND NOT granted")["n"]
                return waiting == 1

            await eventually(heartbeat_waiting, "the heartbeat to stall")
            db.execute("UPDATE episode_schedule_queue SET last_error = NULL,"
                       " lease_expires_at = now() - interval '1 s' WHERE id = %s", [item["id"]])
            reaper = Reaper(c.pool, ReaperConfig(lease_seconds=c.settings.lease_seconds,
                                             max_attempts=3))
            assert [r.id for r in await reaper.run_once()] == [item["id"]]
            c.worker.wake.set()
            await gen.started(2)
            await stall.execute("COMMIT")
            await asyncio.wait_for(beat, 30)
        gen.open(2)
        await eventually(lambda: any(r.outcome is Outcome.SUCCESS for r in reports),
                         "the new attempt to complete")

    reports = run_engine(db_url, gen, scenario)
    assert Outcome.SUCCESS in [r.outcome for r in reports]
    assert one(db, "SELECT status FROM episode_schedule_queue WHERE id = %s",
               item["id"])["status"] == "completed"


def test_one_row_locked_by_someone_else_does_not_stall_the_other_leases(
    db_url: str, db: Conn
) -> None:
    """Case 5: an operator holds `SELECT … FOR UPDATE` on one in-flight item. The heartbeat
    must still renew every other lease at once (and not call the locked one lost)."""
    items = []
    for _ in range(2):
        t = make_tenant(db)
        items.append(make_queue_item(db, t["project"],
                                     scheduled_for=datetime.now(UTC) - timedelta(minutes=1)))
    gen = Gated()

    async def scenario(c: Components, reports: list[AttemptReport]) -> None:
        await gen.started(2)
        locked, free = items[0]["id"], items[1]["id"]
        operator = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        async with operator:
            await operator.execute("BEGIN")
            await operator.execute(
                "SELECT 1 FROM episode_schedule_queue WHERE id = %s FOR UPDATE", [locked])
            before = one(db, "SELECT lease_expires_at FROM episode_schedule_queue"
                             " WHERE id = %s", free)["lease_expires_at"]
            try:
                lost = await asyncio.wait_for(Heartbeat(c.worker).run_once(), 20)
            except TimeoutError:
                pytest.fail("the heartbeat waited on the operator's row lock")
            after = one(db, "SELECT lease_expires_at FROM episode_schedule_queue"
                            " WHERE id = %s", free)["lease_expires_at"]
            await operator.execute("COMMIT")
        assert lost == set()
        assert after > before
        assert all(not e.lost for e in c.worker.in_flight.values())
        gen.open(1)
        gen.open(2)
        await eventually(lambda: len(reports) == 2, "both items to complete")

    reports = run_engine(db_url, gen, scenario)
    assert [r.outcome for r in reports] == [Outcome.SUCCESS, Outcome.SUCCESS]


# -- every path that ends an item ends its episode ----------------------------------------------


def _item_with_a_started_episode(db: Conn, **item_kw: Any) -> tuple[dict[str, Any], ...]:
    """A project whose item's earlier attempt created its episode (still generating)."""
    t = make_tenant(db)
    episode = make_episode(db, t["project"], status="generating")
    item = make_queue_item(db, t["project"], episode_id=episode["id"], attempt_count=1,
                           last_error="provider overloaded", **item_kw)
    return t, item, episode


def _pause(db: Conn, project_id: str) -> None:
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [project_id])


def _by_scheduler(db_url: str, db: Conn, t: dict[str, Any], item: dict[str, Any]) -> None:
    _pause(db, t["project"]["id"])

    async def go() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            await Scheduler(pool, SchedulerConfig(interval=1.0)).run_once()
        finally:
            await pool.close()

    asyncio.run(go())


def _by_worker(db_url: str, db: Conn, t: dict[str, Any], item: dict[str, Any]) -> None:
    _pause(db, t["project"]["id"])
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.CANCELLED]


def _by_cost_skip(db_url: str, db: Conn, t: dict[str, Any], item: dict[str, Any]) -> None:
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    db.execute("UPDATE episode_schedule_queue SET status = 'blocked', blocked_on = %s"
               " WHERE id = %s", [yesterday, item["id"]])

    async def go() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            loop = BudgetLoop(pool, BudgetConfig(policy="skip", default_limit=Decimal(50),
                                             reserve_per_item=Decimal("0.5"), interval=1.0))
            await loop.run_once(datetime.now(UTC))
        finally:
            await pool.close()

    asyncio.run(go())


def _by_enqueue_replace(db_url: str, db: Conn, t: dict[str, Any], item: dict[str, Any]) -> None:
    async def go() -> None:
        conn = await connect(settings_for(db_url))
        async with conn:
            await enqueue_item(conn, t["project"]["id"], at=None, replace=True, actor="test",
                               now=datetime.now(UTC))

    asyncio.run(go())


@pytest.mark.parametrize("path", [_by_scheduler, _by_worker, _by_cost_skip, _by_enqueue_replace],
                         ids=["scheduler-paused", "worker-unavailable", "cost-skip",
                              "enqueue-replace"])
def test_every_path_that_cancels_an_item_fails_the_episode_its_attempt_started(
    db_url: str, db: Conn, path: Callable[[str, Conn, dict[str, Any], dict[str, Any]], None]
) -> None:
    """Case 6: no episode stays `generating` for ever; its history says why it ended."""
    t, item, episode = _item_with_a_started_episode(
        db, scheduled_for=datetime.now(UTC) - timedelta(hours=1))
    path(db_url, db, t, item)
    assert one(db, "SELECT status FROM episode_schedule_queue WHERE id = %s",
               item["id"])["status"] == "cancelled"
    ended = one(db, "SELECT status, generation_errors FROM episodes WHERE id = %s",
                episode["id"])
    assert ended["status"] == "failed"
    assert ended["generation_errors"] and ended["generation_errors"][-1].startswith("cancelled: ")


# -- prepare is idempotent per claim ------------------------------------------------------------


def test_a_prepare_retried_after_its_commit_was_lost_reserves_and_creates_once(
    db_url: str, db: Conn
) -> None:
    """Case 7: the prepare transaction committed but the client saw the connection drop, so the
    worker runs the same unit of work again for the same claim (as `Worker._db` does). The
    second run must find the first one's reservation and episode, not add new ones."""
    t = make_tenant(db)
    make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))

    async def go() -> list[Any]:
        conn = await connect(settings_for(db_url))
        async with conn:
            [claimed] = await queue.claim_due_items(conn, worker="w1", limit=1,
                                                    lease_seconds=60)
            outcomes = []
            for _ in range(2):
                outcomes += await prepare_generations(
                    conn, [claimed], now=datetime.now(UTC),
                    worst_case=lambda _request: Decimal("0.50"), default_limit=Decimal(50))
            return outcomes

    first, second = asyncio.run(go())
    assert isinstance(first, Prepared) and isinstance(second, Prepared)
    assert first.episode_id == second.episode_id
    assert one(db, "SELECT count(*) AS n FROM episodes")["n"] == 1
    assert one(db, "SELECT reserved_gbp FROM token_usage_daily")["reserved_gbp"] == Decimal(
        "0.50")


# -- what the worker role may do ----------------------------------------------------------------


def test_the_worker_role_reads_users_zone_but_not_their_email(
    db: Conn, worker_role_url: str
) -> None:
    """Case 8: the worker needs a user's id, organisation and zone, never their address."""
    make_tenant(db)
    with psycopg.connect(worker_role_url, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT id, organization_id, timezone FROM users").fetchall()
        assert len(rows) == 1
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT email FROM users")


def test_every_security_definer_function_pins_its_search_path_and_is_not_public(
    db: Conn,
) -> None:
    """Case 1, in the catalogue: each SECURITY DEFINER function of the schema searches only
    pg_catalog and then pg_temp (so a temporary table cannot stand in for one of its tables),
    and PUBLIC may not execute it (so nobody can attach it to a table of their own)."""
    rows = db.execute("""
        SELECT p.oid::regprocedure::text AS name, p.proconfig,
               has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef AND n.nspname = 'public'
    """).fetchall()
    assert {r["name"] for r in rows} >= {"mf_token_usage_daily_add()",
                                         "mf_queue_release_reservation()"}
    for r in rows:
        assert r["proconfig"] == ["search_path=pg_catalog, pg_temp"], r
        assert not r["public_execute"], r


def _grant_temp(db: Conn, role: str) -> None:
    dbname = one(db, "SELECT current_database() AS d")["d"]
    db.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(
        sql.Identifier(dbname), sql.Identifier(role)))


def _role_of(conninfo: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return str(conninfo_to_dict(conninfo)["user"])


def test_a_temporary_table_cannot_hijack_the_usage_trigger(
    db: Conn, worker_role_url: str
) -> None:
    """Case 1, replayed: as the documented worker role (even granted TEMP, which the documented
    roles revoke), a temporary `token_usage_daily` with a trigger must neither receive the
    aggregate's upsert nor run with the definer's rights: the usage reaches the real aggregate
    and the other organisation's episode stays unread."""
    mine, theirs = make_tenant(db), make_tenant(db)
    make_episode(db, theirs["project"], title="Their secret plans", status="ready")
    with psycopg.connect(worker_role_url, autocommit=True) as conn, \
            pytest.raises(errors.InsufficientPrivilege):
        conn.execute("CREATE TEMP TABLE probe (x int)")
    _grant_temp(db, _role_of(worker_role_url))
    with psycopg.connect(worker_role_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("""
            CREATE TEMP TABLE token_usage_daily (LIKE public.token_usage_daily
                                                 INCLUDING DEFAULTS,
                                                 PRIMARY KEY (organization_id, date));
            CREATE TEMP TABLE loot (title text);
            CREATE FUNCTION pg_temp.steal() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO pg_temp.loot SELECT title FROM public.episodes;
                RETURN NEW;
            END $$;
            CREATE TRIGGER steal BEFORE INSERT ON pg_temp.token_usage_daily
                FOR EACH ROW EXECUTE FUNCTION pg_temp.steal();
        """)
        with conn.transaction():
            conn.execute("SELECT set_config('app.current_org_id', %s, true)",
                         [mine["org"]["id"]])
            conn.execute(
                "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
                " completion_tokens, cost_gbp)"
                " VALUES (%s, 'episode_generation', 'm', 10, 10, 10)", [mine["org"]["id"]])
        loot = conn.execute("SELECT title FROM pg_temp.loot").fetchall()
    assert loot == []
    spent = one(db, "SELECT total_cost_gbp FROM token_usage_daily WHERE organization_id = %s",
                mine["org"]["id"])
    assert spent["total_cost_gbp"] == Decimal(10)


def test_nobody_can_attach_the_definer_functions_to_a_table_of_their_own(
    db: Conn, worker_role_url: str
) -> None:
    """Case 1, the other door: a role that owns a table (a temporary one) must not be able to
    fire the usage trigger's definer function from it, which would write any organisation's
    aggregate with the owner's rights."""
    theirs = make_tenant(db)
    _grant_temp(db, _role_of(worker_role_url))
    with psycopg.connect(worker_role_url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE fake (organization_id text, created_at timestamptz,"
                     " operation text, total_tokens bigint, cost_gbp numeric)")
        for function in ("mf_token_usage_daily_add", "mf_queue_release_reservation"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(sql.SQL(
                    "CREATE TRIGGER t AFTER INSERT ON pg_temp.fake FOR EACH ROW"
                    " EXECUTE FUNCTION public.{}()").format(sql.Identifier(function)))
    assert db.execute("SELECT 1 FROM token_usage_daily WHERE organization_id = %s",
                      [theirs["org"]["id"]]).fetchone() is None


def test_the_workers_connections_carry_lock_and_statement_timeouts(db_url: str) -> None:
    """Timeouts: a statement that waits on a lock gives up instead of hanging a loop."""

    async def go() -> dict[str, str]:
        settings = settings_for(db_url, db_lock_timeout=3.0, db_statement_timeout=40.0)
        pool = await open_pool(settings, max_size=1)
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT current_setting('lock_timeout') AS lock,"
                    " current_setting('statement_timeout') AS statement,"
                    " current_setting('idle_in_transaction_session_timeout') AS idle")
                row = await cur.fetchone()
                assert row is not None
                return dict(row)
        finally:
            await pool.close()

    assert asyncio.run(go()) == {"lock": "3s", "statement": "40s", "idle": "40s"}


# -- one fence for every transition -------------------------------------------------------------


def _stale_transitions() -> dict[str, Callable[[Any, queue.ClaimedItem], Awaitable[object]]]:
    """Every statement that moves a claimed item (or writes for its claim), as the engine calls
    it; each receives a claim that is no longer the item's."""
    from mf_worker.engine.failures import write_failure
    from mf_worker.engine.write import EpisodeWrite, write_episodes
    from mf_worker.generation import GenerationRequest, ProjectInfo

    def prepared(item: queue.ClaimedItem) -> Prepared:
        request = GenerationRequest(
            queue_item_id=item.id, attempt=item.attempt, organization_id=item.organization_id,
            project=ProjectInfo(id=str(item.project_id), title="t", description="d",
                                cadence_config={"mode": "daily"}, timezone="UTC"),
            episode_number=1, scheduled_for=item.scheduled_for.astimezone(UTC),
            local_date=item.scheduled_for.date(), planning_notes=(), memories=(),
            previous_episodes=(), idempotency_key="k")
        return Prepared(request=request, episode_id="ep_stale", new_episode=True, user_id="u",
                        cadence_config={"mode": "daily"}, delivery_time=datetime.min.time(),
                        timezone="UTC")

    async def final_write(conn: Any, item: queue.ClaimedItem) -> object:
        p = prepared(item)
        [outcome] = await write_episodes(conn, [EpisodeWrite(
            item=item, prepared=p, result=TemplateGenerator().write(p.request), costs=(Decimal(0),),
            now=datetime.now(UTC))])
        return outcome

    async def reservation(conn: Any, item: queue.ClaimedItem) -> object:
        [outcome] = await prepare_generations(
            conn, [item], now=datetime.now(UTC), worst_case=lambda _r: Decimal("0.50"),
            default_limit=Decimal(50))
        return outcome

    async def failure(conn: Any, item: queue.ClaimedItem) -> object:
        try:
            return await write_failure(conn, item, None, error="boom", retry_in=None)
        except Exception as exc:  # LeaseLost is the expected answer
            return exc

    return {
        "heartbeat": lambda conn, item: queue.extend_leases(conn, [item], lease_seconds=60),
        "complete": lambda conn, item: queue.complete_items(conn, [item]),
        "retry": lambda conn, item: queue.retry_item(conn, item, delay_seconds=1, error="x"),
        "fail": lambda conn, item: queue.finish_item(conn, item, status="failed", error="x"),
        "cancel": lambda conn, item: queue.finish_item(conn, item, status="cancelled",
                                                       error="x"),
        "release": lambda conn, item: queue.release_item(conn, item),
        "block": lambda conn, item: queue.release_item(conn, item, status="blocked",
                                                       blocked_on=datetime.now(UTC).date()),
        "reserve": reservation,
        "final-write": final_write,
        "write-failure": failure,
    }


@pytest.mark.parametrize("transition", sorted(_stale_transitions()))
def test_a_stale_claim_token_moves_nothing(db_url: str, db: Conn, transition: str) -> None:
    """The item was claimed (token A), cancelled and retried by an operator, and claimed again
    by the same worker as attempt 1 — everything (id, attempt, worker) but the token repeats.
    Each transition run with claim A must change no row anywhere."""
    t = make_tenant(db)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))

    async def go() -> tuple[object, int, int]:
        conn = await connect(settings_for(db_url))
        async with conn:
            [stale] = await queue.claim_due_items(conn, worker="w1", limit=1, lease_seconds=60)
            await cancel_queue_item(conn, item["id"], "operator", actor="test")
            await retry_queue_item(conn, item["id"], actor="test")
            [current] = await queue.claim_due_items(conn, worker="w1", limit=1,
                                                    lease_seconds=60)
            assert (current.id, current.attempt) == (stale.id, stale.attempt)
            assert current.token != stale.token
            before = await _everything(conn)
            outcome = await _stale_transitions()[transition](conn, stale)
            return outcome, before, await _everything(conn)

    outcome, before, after = asyncio.run(go())
    assert after == before, f"{transition} with a stale token changed something ({outcome!r})"
    assert outcome in (False, set()) or type(outcome).__name__ in ("LeaseLost", "LeaseRenewal")
    if type(outcome).__name__ == "LeaseRenewal":
        assert not outcome.held  # type: ignore[attr-defined]


async def _everything(conn: Any) -> Any:
    """A fingerprint of every row the transitions could touch."""
    cur = await conn.execute("""
        SELECT (SELECT md5(string_agg(q::text, '|' ORDER BY id)) FROM episode_schedule_queue q),
               (SELECT md5(coalesce(string_agg(e::text, '|' ORDER BY id), '')) FROM episodes e),
               (SELECT md5(coalesce(string_agg(d::text, '|' ORDER BY organization_id, date), ''))
                  FROM token_usage_daily d),
               (SELECT count(*) FROM token_usage) + (SELECT count(*) FROM blocks)
    """)
    return await cur.fetchone()


def test_a_claim_by_an_older_worker_still_draws_a_new_token(db_url: str, db: Conn) -> None:
    """During a rolling upgrade an older mf-worker claims without drawing a token; the queue's
    trigger draws one, so its claim never carries the token of a claim before it."""
    t = make_tenant(db)
    item = make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))
    old_claim = ("UPDATE episode_schedule_queue SET status = 'processing',"
                 " attempt_count = attempt_count + 1, locked_by = 'old-worker',"
                 " lease_expires_at = now() + interval '1 minute' WHERE id = %s"
                 " RETURNING claim_token")
    first = one(db, old_claim, item["id"])["claim_token"]
    db.execute("UPDATE episode_schedule_queue SET status = 'pending', locked_by = NULL,"
               " lease_expires_at = NULL WHERE id = %s", [item["id"]])
    second = one(db, old_claim, item["id"])["claim_token"]
    assert first is not None and second is not None and second != first


def test_a_prepare_retried_while_the_first_commit_is_still_in_flight_reuses_its_episode(
    db_url: str, db: Conn
) -> None:
    """Case 7, the harder interleaving: the retry reads its context before the first run's
    commit is visible (so it picks a new episode id), then waits on the item's row until that
    commit lands. It must still end with the first run's episode and one reservation."""
    t = make_tenant(db)
    make_queue_item(db, t["project"], scheduled_for=datetime.now(UTC) - timedelta(minutes=1))

    async def go() -> tuple[Any, Any]:
        first_conn = await connect(settings_for(db_url))
        second_conn = await connect(settings_for(db_url))
        async with first_conn, second_conn:
            [claimed] = await queue.claim_due_items(first_conn, worker="w1", limit=1,
                                                    lease_seconds=60)

            async def prepare(conn: Any) -> Any:
                [outcome] = await prepare_generations(
                    conn, [claimed], now=None, worst_case=lambda _r: Decimal("0.50"),
                    default_limit=Decimal(50))
                return outcome

            await first_conn.execute("BEGIN")
            first = await prepare(first_conn)  # runs inside the open transaction
            retry = asyncio.create_task(prepare(second_conn))
            await eventually(lambda: one(db, "SELECT count(*) AS n FROM pg_locks"
                                             " WHERE NOT granted")["n"] >= 1,
                             "the retry to wait on the item's row")
            await first_conn.execute("COMMIT")
            return first, await asyncio.wait_for(retry, 30)

    first, second = asyncio.run(go())
    assert isinstance(first, Prepared) and isinstance(second, Prepared), (first, second)
    assert second.episode_id == first.episode_id
    assert one(db, "SELECT count(*) AS n FROM episodes")["n"] == 1
    assert one(db, "SELECT reserved_gbp FROM token_usage_daily")["reserved_gbp"] == Decimal(
        "0.50")


def test_an_older_worker_still_records_its_last_error_on_the_failed_episode(
    db_url: str, db: Conn
) -> None:
    """During a rolling upgrade an older mf-worker fails an item and then, in the same
    transaction, records the attempt on the episode only while it is still 'generating'. The
    queue's episode trigger runs at commit, so that record is kept."""
    _, item, episode = _item_with_a_started_episode(
        db, scheduled_for=datetime.now(UTC) - timedelta(hours=1))
    db.execute("UPDATE episode_schedule_queue SET status = 'processing', locked_by = 'old',"
               " lease_expires_at = now() + interval '1 minute' WHERE id = %s", [item["id"]])
    with db.transaction():
        db.execute("UPDATE episode_schedule_queue SET status = 'failed', last_error = 'boom',"
                   " locked_by = NULL, lease_expires_at = NULL WHERE id = %s", [item["id"]])
        recorded = db.execute(
            "UPDATE episodes SET generation_attempts = generation_attempts + 1,"
            " generation_errors = generation_errors || 'attempt 2: boom'::text"
            " WHERE id = %s AND status = 'generating'", [episode["id"]])
        assert recorded.rowcount == 1
    ended = one(db, "SELECT status, generation_errors FROM episodes WHERE id = %s",
                episode["id"])
    assert ended == {"status": "failed", "generation_errors": ["attempt 2: boom"]}


def test_timeouts_keep_the_options_already_in_the_database_url(db_url: str) -> None:
    """`?options=-c …` in MF_DATABASE_URL (a search_path, a provider's endpoint id) is kept;
    the timeouts are added after it."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    url = make_conninfo("", **{**conninfo_to_dict(db_url), "options": "-c work_mem=77MB"})

    async def go() -> dict[str, str]:
        pool = await open_pool(settings_for(url, db_lock_timeout=3.0), max_size=1)
        try:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT current_setting('work_mem') AS work_mem,"
                                         " current_setting('lock_timeout') AS lock")
                row = await cur.fetchone()
                assert row is not None
                return dict(row)
        finally:
            await pool.close()

    assert asyncio.run(go()) == {"work_mem": "77MB", "lock": "3s"}
