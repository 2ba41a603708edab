"""A worker that cannot do its work says so, and one that may not claim does not spin (#24).

* Idle with due items that no claim may take (every one's organisation at
  ``MF_ORG_MAX_IN_FLIGHT``), the claim loop waits for a slot, a notification or the poll
  interval instead of claiming again every 5 ms, and stays healthy: those items are no sign of
  a broken worker.
* A worker whose claims fail (the queue table locked by another session for longer than
  ``MF_DB_LOCK_TIMEOUT``) turns ``/healthz`` red after ``MF_HEALTH_STARVED_SECONDS``, stops
  feeding the systemd watchdog, exports why, and recovers once it can claim again.
* A read-only server (a standby reached before its promotion) is waited out: the daemon keeps
  running, ``/readyz`` says the server takes no writes, and the connections that met it are
  replaced, so the worker claims again as soon as the server takes writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from mf_worker.daemon import build, serve
from mf_worker.engine.events import ClaimLoopTicked
from mf_worker.generation import load_generator

from .conftest import settings_for
from .factories import make_queue_item, make_tenant
from .test_deploy import NotifyListener
from .workers import SCRIPTED, http_get, llm_settings, port_of, start_worker, wait_until

Conn = psycopg.Connection[dict[str, Any]]


def scalar(conn: Conn, sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return next(iter(row.values()))


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def test_an_idle_worker_whose_due_items_are_all_capped_waits_instead_of_spinning(
    db_url: str, db: Conn,
) -> None:
    """One organisation at its cap of one (its other item is processing elsewhere), one of its
    items due: for 3 s the claim loop goes round about once per poll interval (1 s), not every
    5 ms, and /healthz stays 200 with MF_HEALTH_STARVED_SECONDS=1 (capped is not starved)."""
    tenant = make_tenant(db)
    busy = make_tenant(db, title="second project")  # another project of the same org
    db.execute("UPDATE projects SET organization_id = %s, user_id = %s WHERE id = %s",
               [tenant["org"]["id"], tenant["user"]["id"], busy["project"]["id"]])
    busy["project"]["organization_id"] = tenant["org"]["id"]
    make_queue_item(db, busy["project"], status="processing", locked_by="elsewhere",
                    claim_token=1, attempt_count=1,
                    lease_expires_at=scalar(db, "SELECT now() + interval '10 minutes'"))
    due = make_queue_item(db, tenant["project"])
    settings = settings_for(db_url, org_max_in_flight=1, poll_interval=1.0,
                            health_starved_seconds=1.0)
    ticks: list[float] = []
    health: list[tuple[int, dict[str, Any]]] = []

    async def main() -> None:
        components = await build(settings, generator=load_generator(SCRIPTED, llm_settings()),
                                 scheduler=False)
        components.events.subscribe(ClaimLoopTicked, lambda _t: ticks.append(time.monotonic()))
        task = asyncio.create_task(serve(components, install_signals=False))
        await asyncio.sleep(0.5)  # started, and the first claims made
        ticks.clear()
        await asyncio.sleep(3.0)
        assert components.http is not None
        status, body = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{components.http.port}/healthz")
        health.append((status, json.loads(body)))
        components.worker.stop()
        assert await task == 0

    xacts_before = scalar(db, "SELECT xact_commit FROM pg_stat_database"
                              " WHERE datname = current_database()")
    asyncio.run(main())
    db.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(0.6)  # the pool's backends flush their statistics as they exit
    xacts = scalar(db, "SELECT xact_commit FROM pg_stat_database"
                       " WHERE datname = current_database()") - xacts_before
    print(f"claim-loop rounds in 3 s: {len(ticks)}; transactions committed in the run: {xacts}")
    assert len(ticks) <= 6, f"{len(ticks)} claim-loop rounds in 3 s: the idle worker spins"
    assert health == [(200, health[0][1])] and health[0][1]["status"] == "ok"
    assert scalar(db, "SELECT status FROM episode_schedule_queue WHERE id = %s",
                  due["id"]) == "pending"


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_a_worker_that_cannot_claim_turns_healthz_red_and_stops_feeding_the_watchdog(
    worker_role_url: str, db_url: str, tmp_path: Path,
) -> None:
    """The queue table is locked by another session (ACCESS EXCLUSIVE, as ALTER TABLE or
    VACUUM FULL takes it) that also inserts a due item, for longer than MF_DB_LOCK_TIMEOUT
    (0.3 s): every claim fails. After MF_HEALTH_STARVED_SECONDS (2 s) /healthz answers 503
    naming claim_failing, the metric says so, and no WATCHDOG=1 is sent while it lasts; once
    the lock goes, the worker claims the item, completes it, and is healthy and fed again."""
    directory = tempfile.mkdtemp(prefix="mf-sd-")
    listener = NotifyListener(os.path.join(directory, "notify.sock"))
    log = tmp_path / "w.log"
    worker = start_worker(
        worker_role_url, log=log, MF_HEALTH_STARVED_SECONDS="2", MF_DB_LOCK_TIMEOUT="0.3",
        MF_POLL_INTERVAL="0.2", NOTIFY_SOCKET=os.path.join(directory, "notify.sock"),
        WATCHDOG_USEC="1000000")
    locker = psycopg.connect(db_url, row_factory=dict_row)
    try:
        port = port_of(log)
        healthz, metrics = (f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{port}/metrics")
        wait_until(lambda: http_get(healthz)[0] == 200, 20, "a healthy start")
        locker.execute("LOCK TABLE episode_schedule_queue IN ACCESS EXCLUSIVE MODE")
        item = make_queue_item(locker, make_tenant(locker)["project"])
        locked_at = time.monotonic()
        wait_until(lambda: http_get(healthz)[0] == 503, 20, "/healthz to turn red")
        red_after = time.monotonic() - locked_at
        body = json.loads(http_get(healthz)[1])
        assert (body["status"], body["reason"]) == ("not claiming", "claim_failing")
        assert "LockNotAvailable" in body["error"]
        assert 'mf_worker_claim_starved_seconds{reason="claim_failing"} 0' not in \
            http_get(metrics)[1]
        red_at = time.monotonic()
        time.sleep(2.0)  # two watchdog half-intervals while red
        fed_while_red = [t for t in listener.states("WATCHDOG=1") if t > red_at]
        locker.commit()  # the lock goes, the item becomes visible (and notified)
        with psycopg.connect(db_url) as check:
            wait_until(lambda: check.execute(
                "SELECT status FROM episode_schedule_queue WHERE id = %s",
                [item["id"]]).fetchone() == ("completed",), 30, "the item to complete")
        wait_until(lambda: http_get(healthz)[0] == 200, 20, "/healthz to recover")
        green_at = time.monotonic()
        listener.collect_until(lambda m: any(t > green_at for t, s in m if s == "WATCHDOG=1"),
                               10, "the watchdog fed again")
        print(f"/healthz red {red_after:.1f} s after the lock (MF_HEALTH_STARVED_SECONDS=2)")
        assert fed_while_red == []
    finally:
        locker.close()
        assert stop(worker) == 0
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)
    text = log.read_text()
    assert '"claims_starving"' in text and '"claims_resumed"' in text


def test_a_read_only_server_is_waited_out_and_its_connections_replaced(
    db_url: str, db: Conn, pg_admin_url: str,
) -> None:
    """The database's transactions are read-only (as on a standby before its promotion) when
    the daemon starts: its claims fail with ReadOnlySqlTransaction, the daemon keeps running,
    /readyz answers 503. Made writable again (without touching the daemon's connections),
    the worker claims and completes every item and /readyz answers 200: the connections that
    met the read-only server were replaced, not reused."""
    for _ in range(3):
        make_queue_item(db, make_tenant(db)["project"])
    dbname = conninfo_to_dict(db_url)["dbname"]
    admin = psycopg.connect(pg_admin_url, autocommit=True)
    admin.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    settings = settings_for(db_url, poll_interval=0.2)
    seen: dict[str, Any] = {}

    def completed() -> int:
        return int(scalar(db, "SELECT count(*) FROM episode_schedule_queue"
                              " WHERE status = 'completed'"))

    async def main() -> None:
        components = await build(settings, generator=load_generator(SCRIPTED, llm_settings()),
                                 scheduler=False)
        task = asyncio.create_task(serve(components, install_signals=False))
        await asyncio.sleep(2.0)
        assert components.http is not None
        readyz = f"http://127.0.0.1:{components.http.port}/readyz"
        seen["running"] = not task.done()
        seen["readyz_read_only"] = await asyncio.to_thread(http_get, readyz)
        seen["completed_read_only"] = await asyncio.to_thread(completed)
        admin.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        await asyncio.to_thread(wait_until, lambda: completed() == 3, 30, "every item done")
        seen["readyz_writable"] = await asyncio.to_thread(http_get, readyz)
        components.worker.stop()
        seen["exit"] = await task

    try:
        asyncio.run(main())
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        admin.close()
    assert seen["running"], "the daemon ended on a read-only server"
    status, body = seen["readyz_read_only"]
    assert status == 503 and "read-only" in json.loads(body)["error"]
    assert seen["completed_read_only"] == 0
    assert completed() == 3
    assert seen["readyz_writable"][0] == 200
    assert seen["exit"] == 0


def test_a_database_error_retrying_cannot_fix_does_not_end_the_daemon(
    worker_role_url: str, db: Conn,
) -> None:
    """The worker's role loses UPDATE on the queue (an operator's mistake): every claim fails
    with InsufficientPrivilege, which no retry fixes, yet the daemon keeps running and says so
    (/healthz red, naming the error); once the grant is back it claims and completes the item,
    and it ends with 0 when stopped."""
    role = conninfo_to_dict(worker_role_url)["user"]
    make_queue_item(db, make_tenant(db)["project"])
    db.execute(f'REVOKE UPDATE ON episode_schedule_queue FROM "{role}"')
    settings = settings_for(worker_role_url, poll_interval=0.2, health_starved_seconds=1.0)
    seen: dict[str, Any] = {}

    def completed() -> int:
        return int(scalar(db, "SELECT count(*) FROM episode_schedule_queue"
                              " WHERE status = 'completed'"))

    async def main() -> None:
        components = await build(settings, generator=load_generator(SCRIPTED, llm_settings()),
                                 scheduler=False)
        task = asyncio.create_task(serve(components, install_signals=False))
        await asyncio.sleep(2.5)
        assert components.http is not None
        healthz = f"http://127.0.0.1:{components.http.port}/healthz"
        seen["running"] = not task.done()
        seen["healthz"] = await asyncio.to_thread(http_get, healthz)
        db.execute(f'GRANT UPDATE ON episode_schedule_queue TO "{role}"')
        await asyncio.to_thread(wait_until, lambda: completed() == 1, 30, "the item done")
        seen["healthz_after"] = await asyncio.to_thread(http_get, healthz)
        components.worker.stop()
        seen["exit"] = await task

    asyncio.run(main())
    assert seen["running"]
    status, body = seen["healthz"]
    assert status == 503 and "InsufficientPrivilege" in json.loads(body)["error"]
    assert seen["healthz_after"][0] == 200
    assert seen["exit"] == 0
