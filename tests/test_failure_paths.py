"""Documented failure paths that had no test: the reaper giving up on an item, a generator that
times out or cannot connect, commands that refuse a database or an item, a listener whose
connection dies without a word, and the metrics that count these events."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mf_worker.daemon import build, serve
from mf_worker.db import open_pool
from mf_worker.engine.events import EventHub
from mf_worker.engine.worker import AttemptReport, FailureReason, Outcome
from mf_worker.generation import load_generator
from mf_worker.maintenance.listener import Listener, ListenerConfig
from mf_worker.maintenance.reaper import Reaper, ReaperConfig
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.observability.metrics import Metrics

from .conftest import settings_for
from .factories import make_project, make_queue_item, make_tenant, make_user, one
from .workers import ROOT, SCRIPTED, run_burst, worker_env

Conn = psycopg.Connection[dict[str, Any]]


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                          text=True, env=worker_env(url), cwd=ROOT, timeout=120, check=False)


def burst_with_metrics(db_url: str, **overrides: Any
                       ) -> tuple[list[AttemptReport], CollectorRegistry]:
    """`run --burst` in this process, wired as the daemon wires it; its metrics afterwards."""
    reports: list[AttemptReport] = []
    settings = settings_for(db_url, **{"poll_interval": 0.05, **overrides})

    async def main() -> CollectorRegistry:
        components = await build(settings, generator=load_generator(SCRIPTED),
                                 observers=[reports.append], scheduler=False)
        await serve(components, burst=True, install_signals=False)
        return components.metrics.registry

    return reports, asyncio.run(main())


# -- the reaper ------------------------------------------------------------------------------


def test_reaper_fails_an_item_that_used_all_its_attempts_and_returns_one_that_did_not(
    db_url: str, db: Conn
) -> None:
    """Two workers vanished holding items: the one on its last attempt is failed with the
    reason, the other goes back to pending; the episode keeps the lost attempt, and the
    reaped counter moves by result."""
    t = make_tenant(db)
    # Workers were lost on it twice already: this third loss is its last (MF_MAX_ATTEMPTS 3).
    last = make_queue_item(db, t["project"], attempt_count=2, lost_count=2)
    other = make_queue_item(db, make_project(db, t["user"]))
    metrics = Metrics(concurrency=1, process_metrics=False)

    async def scenario() -> list[Any]:
        from mf_worker import queue

        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            async with pool.connection() as conn:
                claimed = await queue.claim_due_items(conn, worker="ghost", limit=2,
                                                      lease_seconds=60)
            assert {c.id for c in claimed} == {last["id"], other["id"]}
            # The ghost never renews: its leases run out (time moved, not slept through).
            db.execute("UPDATE episode_schedule_queue"
                       " SET lease_expires_at = now() - interval '1 s'")
            events = EventHub()
            metrics.subscribe(events)
            reaper = Reaper(pool, ReaperConfig(lease_seconds=60, max_attempts=3), events=events)
            return await reaper.run_once()
        finally:
            await pool.close()

    reaped = asyncio.run(scenario())
    assert {r.id: r.status for r in reaped} == {last["id"]: "failed", other["id"]: "pending"}
    failed = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", last["id"])
    assert (failed["status"], failed["attempt_count"], failed["locked_by"]) == ("failed", 3, None)
    assert failed["last_error"].startswith("worker lost: ghost stopped renewing its lease on"
                                           " attempt 3")
    back = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", other["id"])
    assert (back["status"], back["attempt_count"]) == ("pending", 1)
    sample = metrics.registry.get_sample_value
    assert sample("mf_worker_items_reaped_total", {"result": "failed"}) == 1
    assert sample("mf_worker_items_reaped_total", {"result": "returned"}) == 1


# -- generators that time out or cannot connect ---------------------------------------------


def test_a_generation_past_mf_generation_timeout_is_retried_and_says_so(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db, title="slow:120")
    item = make_queue_item(db, t["project"])
    reports, registry = burst_with_metrics(db_url, generation_timeout=0.5)
    assert [(r.outcome, r.reason) for r in reports] == [(Outcome.RETRY, FailureReason.TIMEOUT)]
    state = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert state["status"] == "pending" and state["attempt_count"] == 1
    assert state["last_error"] == "generation timed out after 0.5 s"
    assert registry.get_sample_value("mf_worker_failures_total", {"reason": "timeout"}) == 1


def test_a_generator_that_cannot_connect_is_retried_not_failed(db_url: str, db: Conn) -> None:
    t = make_tenant(db, title="unreachable")
    item = make_queue_item(db, t["project"])
    reports = run_burst(db_url)
    assert [(r.outcome, r.reason) for r in reports] == [
        (Outcome.RETRY, FailureReason.GENERATOR_RETRYABLE)]
    state = one(db, "SELECT * FROM episode_schedule_queue WHERE id = %s", item["id"])
    assert state["status"] == "pending"
    assert state["last_error"].startswith("generator connection failed: ConnectionRefusedError")


# -- commands that refuse --------------------------------------------------------------------


def test_run_refuses_a_database_with_pending_migrations_and_says_what_to_do(
    db_url: str, db: Conn
) -> None:
    newest = one(db, "SELECT version, name FROM mf_schema_migrations"
                     " ORDER BY version DESC LIMIT 1")
    db.execute("DELETE FROM mf_schema_migrations WHERE version = %s", [newest["version"]])
    make_queue_item(db, make_tenant(db)["project"])
    for command in (["run", "--burst"], ["run-once"]):
        refused = cli(*command, url=db_url)
        assert refused.returncode == 1, (command, refused.stderr)
        assert "1 pending migration(s)" in refused.stderr
        assert f"{newest['version']:04d}_{newest['name']}" in refused.stderr
        assert "run `mf-worker migrate` first" in refused.stderr
    assert one(db, "SELECT count(*) AS n FROM episode_schedule_queue"
                   " WHERE status <> 'pending'")["n"] == 0  # nothing was claimed


def test_migrate_status_flags_a_released_migration_that_was_edited(db_url: str, db: Conn) -> None:
    first = one(db, "SELECT version, name FROM mf_schema_migrations ORDER BY version LIMIT 1")
    clean = cli("migrate", "--status", url=db_url)
    assert clean.returncode == 0 and "file changed" not in clean.stdout, clean.stdout
    db.execute("UPDATE mf_schema_migrations SET checksum = 'edited' WHERE version = %s",
               [first["version"]])
    flagged = cli("migrate", "--status", url=db_url)
    assert flagged.returncode == 0, flagged.stderr
    lines = [line for line in flagged.stdout.splitlines() if "file changed" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{first['version']:04d}_{first['name']}")
    assert lines[0].endswith("(file changed since it was applied)")


def test_run_once_id_refuses_an_item_that_is_not_pending(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    done = make_queue_item(db, t["project"], status="completed", completed_at=datetime.now(UTC))
    held = make_queue_item(db, make_project(db, t["user"]))
    # Held by another worker (as a claim leaves it; the claim trigger draws its token).
    db.execute("UPDATE episode_schedule_queue SET status = 'processing', attempt_count = 1,"
               " locked_by = 'other-host', lease_expires_at = now() + interval '5 minutes'"
               " WHERE id = %s", [held["id"]])
    for item_id, reason in [
        (done["id"], f"{done['id']} is completed, not pending (use `mf-worker retry` first)"),
        (held["id"], f"{held['id']} is being processed by other-host"),
        ("queue_nope", "no queue item 'queue_nope'"),
    ]:
        refused = cli("run-once", "--id", item_id, url=db_url)
        assert refused.returncode == 1, refused.stderr
        assert reason in refused.stderr, refused.stderr
    assert one(db, "SELECT locked_by, attempt_count FROM episode_schedule_queue WHERE id = %s",
               held["id"]) == {"locked_by": "other-host", "attempt_count": 1}
    assert one(db, "SELECT count(*) AS n FROM episodes")["n"] == 0


# -- metrics that had never been seen to move -----------------------------------------------


def test_cost_limit_trips_are_counted_per_blocked_item(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    db.execute("UPDATE organizations SET daily_cost_limit_gbp = 0.50 WHERE id = %s",
               [t["org"]["id"]])
    for _ in range(3):
        make_queue_item(db, make_project(db, t["user"], title="costly:0"))
    reports, registry = burst_with_metrics(db_url, concurrency=1)
    # One item fits the £0.50; the next claimed item meets the limit and is blocked, and the
    # breaker blocks the third while it waits (unclaimed: no attempt, no report).
    assert sorted(r.outcome for r in reports) == [Outcome.BLOCKED, Outcome.SUCCESS]
    assert registry.get_sample_value("mf_worker_cost_limit_trips_total") == 1
    assert registry.get_sample_value("mf_worker_attempts_total", {"outcome": "blocked"}) == 1
    assert one(db, "SELECT count(*) AS n FROM episode_schedule_queue"
                   " WHERE status = 'blocked'")["n"] >= 2


def test_scheduler_pass_counts_created_items_and_invalid_projects(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    make_project(db, t["user"])
    make_project(db, make_user(db, t["org"], timezone="Mars/Olympus"))
    metrics = Metrics(concurrency=1, process_metrics=False)

    async def one_pass() -> Any:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            events = EventHub()
            metrics.subscribe(events)
            return await Scheduler(pool, SchedulerConfig(interval=60),
                                   events=events).run_once()
        finally:
            await pool.close()

    result = asyncio.run(one_pass())
    assert result.created == 2 and len(result.invalid) == 1
    sample = metrics.registry.get_sample_value
    assert sample("mf_worker_scheduler_items_created_total") == 2
    assert sample("mf_worker_scheduler_invalid_projects") == 1


def test_claim_loop_tick_moves_while_the_loop_runs(db_url: str, db: Conn) -> None:
    make_queue_item(db, make_tenant(db)["project"])
    before = datetime.now(UTC).timestamp()
    _reports, registry = burst_with_metrics(db_url)
    tick = registry.get_sample_value("mf_worker_claim_loop_last_tick_timestamp_seconds")
    assert tick is not None and tick >= before


# -- a listener whose connection dies silently -----------------------------------------------


class FreezableProxy:
    """A TCP proxy in front of PostgreSQL whose open connections can be frozen: bytes stop
    flowing both ways but no socket is closed, as when a NAT or firewall drops a connection
    without telling either end. Connections made after a freeze flow normally."""

    def __init__(self, db_url: str) -> None:
        params = conninfo_to_dict(db_url)
        self.upstream_host = str(params.get("host") or "/var/run/postgresql")
        self.upstream_port = int(params.get("port") or 5432)
        self.frozen: list[asyncio.Event] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def freeze_all(self) -> None:
        for flowing in self.frozen:
            flowing.clear()

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream_host.startswith("/"):
            return await asyncio.open_unix_connection(
                f"{self.upstream_host}/.s.PGSQL.{self.upstream_port}")
        return await asyncio.open_connection(self.upstream_host, self.upstream_port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        flowing = asyncio.Event()
        flowing.set()
        self.frozen.append(flowing)
        up_reader, up_writer = await self._upstream()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                await flowing.wait()  # frozen: hold the bytes, close nothing
                dst.write(data)
                await dst.drain()

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for flowing in self.frozen:
            flowing.set()


@pytest.mark.slow  # the ping waits 10 s for an answer that never comes
def test_listener_ping_finds_a_silently_dead_connection_and_listens_again(
    db_url: str, db: Conn
) -> None:
    """The listener's connection stops carrying bytes without being closed (no error, no
    FIN). The next quiet-period ping gets no answer, the listener reconnects, and a NOTIFY
    on the new connection wakes the worker."""
    async def scenario() -> int:
        proxy = FreezableProxy(db_url)
        port = await proxy.start()
        via = make_conninfo(db_url, host="127.0.0.1", port=port)
        wake = asyncio.Event()
        listener = Listener(settings_for(via), wake, ListenerConfig(ping_interval=0.2))
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 20)
            proxy.freeze_all()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while listener.reconnects < 2:  # the ping gives up after 10 s, then reconnects
                assert loop.time() < deadline, "the listener never noticed the dead connection"
                await asyncio.sleep(0.05)
            await asyncio.wait_for(listener.connected.wait(), 20)
            wake.clear()
            await asyncio.to_thread(lambda: make_queue_item(db, make_tenant(db)["project"]))
            await asyncio.wait_for(wake.wait(), 20)  # woken through the new connection
            return proxy.connections
        finally:
            listener.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await proxy.close()

    assert asyncio.run(scenario()) >= 2
