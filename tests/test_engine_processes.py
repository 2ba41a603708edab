"""The engine as real `mf-worker` processes: raced, killed, frozen, stopped, cut off, pooled.

These tests start real daemons against the test's database and act on them the way production
does: SIGKILL, SIGSTOP/SIGCONT, SIGTERM, terminated database backends, a real PgBouncer. They
share one xdist group so they never compete with each other for the server's connections.
The daemons log in as the documented least-privilege role (``worker_role_url``), so row-level
security applies to everything they do, as in production; the test reads as the owner.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .conftest import REQUIRE_ALL, require_binary
from .factories import make_queue_item, make_tenant
from .workers import ROOT, start_worker, wait_until, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

Conn = psycopg.Connection[dict[str, Any]]

# The lease of the lease tests. The heartbeat renews every third of it, so a worker whose
# event loop or CPU share stalls for two thirds of a lease loses its item: with 2 s that was
# 1.3 s, which a shared 2-core machine can take. 6 s leaves 4 s.
LEASE = "6"


def scalar(conn: Conn, sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return next(iter(row.values()))


def status_of(conn: Conn, item_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM episode_schedule_queue WHERE id = %s", [item_id]).fetchone()
    assert row is not None
    return row


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


SEED_STATEMENTS = [
    """
    INSERT INTO organizations (id, name) SELECT 'org_' || g, 'Org ' || g
    FROM generate_series(1, %(orgs)s) g
    """,
    """
    INSERT INTO users (id, organization_id, email, timezone)
    SELECT 'usr_' || g, 'org_' || g, 'u' || g || '@example.com',
           (ARRAY['Europe/London', 'America/New_York', 'Asia/Tokyo', 'UTC'])[1 + g %% 4]
    FROM generate_series(1, %(orgs)s) g
    """,
    """
    INSERT INTO projects (id, organization_id, user_id, title, cadence_config)
    SELECT 'prj_' || g, 'org_' || (1 + g %% %(orgs)s), 'usr_' || (1 + g %% %(orgs)s),
           %(title)s, '{"mode": "daily"}'
    FROM generate_series(1, %(items)s) g
    """,
    """
    INSERT INTO planning_notes (id, project_id, organization_id, user_id, note)
    SELECT 'note_' || g, 'prj_' || g, 'org_' || (1 + g %% %(orgs)s),
           'usr_' || (1 + g %% %(orgs)s), 'Note for project ' || g
    FROM generate_series(1, %(items)s) g
    """,
    """
    INSERT INTO episode_schedule_queue (id, project_id, organization_id, scheduled_for)
    SELECT 'queue_' || g, 'prj_' || g, 'org_' || (1 + g %% %(orgs)s), now() - interval '1 s'
    FROM generate_series(1, %(items)s) g
    """,
]


def seed_many(conn: Conn, *, orgs: int, items: int, title: str = "fast") -> None:
    """``items`` projects (one due item and one planning note each) across ``orgs`` orgs."""
    params = {"orgs": orgs, "items": items, "title": title}
    for statement in SEED_STATEMENTS:
        conn.execute(statement, params)


def test_exactly_once_with_four_racing_worker_processes(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    """4 processes × concurrency 8 over 2,000 due items in 50 orgs: every item completes once,
    one episode each, every note incorporated once, aggregates equal the raw rows."""
    seed_many(db, orgs=50, items=2000)
    workers = [
        start_worker(worker_role_url, "--burst", log=tmp_path / f"w{i}.log",
                     MF_CONCURRENCY="8", MF_POOL_MAX_SIZE="10", MF_WORKER_ID=f"racer-{i}")
        for i in range(4)
    ]
    codes = [w.wait(timeout=300) for w in workers]
    assert codes == [0, 0, 0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(4)]

    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue"
                      " WHERE status = 'completed' AND attempt_count = 1") == 2000
    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE status NOT IN"
                      " ('completed', 'pending')") == 0
    assert scalar(db, "SELECT count(*) FROM episodes WHERE status = 'ready'") == 2000
    assert scalar(db, "SELECT count(DISTINCT project_id) FROM episodes") == 2000
    assert scalar(db, "SELECT max(sequence_number) FROM episodes") == 1
    assert scalar(db, "SELECT count(*) FROM planning_notes WHERE status = 'incorporated'"
                      " AND episode_id IS NOT NULL") == 2000
    assert scalar(db, "SELECT count(*) FROM token_usage") == 2000
    assert scalar(db, "SELECT count(*) FROM audit_log WHERE action = 'episode.generate'") == 2000
    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE status = 'pending'"
                      " AND scheduled_for > now()") == 2000  # each project's next item
    mismatched = db.execute(
        """
        SELECT d.organization_id FROM token_usage_daily d
        JOIN (SELECT organization_id, sum(total_tokens) AS tokens, sum(cost_gbp) AS cost,
                     count(*) AS episodes
              FROM token_usage GROUP BY organization_id) r USING (organization_id)
        WHERE d.total_tokens <> r.tokens OR d.total_cost_gbp <> r.cost
           OR d.episode_count <> r.episodes
        """
    ).fetchall()
    assert mismatched == []
    assert scalar(db, "SELECT count(*) FROM token_usage_daily") == 50
    per_worker = [(tmp_path / f"w{i}.log").read_text().count('"item_completed"')
                  for i in range(4)]
    assert sum(per_worker) == 2000 and all(n > 0 for n in per_worker), per_worker


def test_sigkilled_worker_is_recovered_after_its_lease_expires(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    t = make_tenant(db, title="slow-once:60")
    item = make_queue_item(db, t["project"])
    a = start_worker(worker_role_url, log=tmp_path / "a.log", MF_LEASE_SECONDS=LEASE,
                     MF_WORKER_ID="a")
    # Killed inside the generation: its prepare has committed the episode row.
    wait_until(lambda: scalar(db, "SELECT count(*) FROM episodes WHERE project_id = %s"
                                  " AND status = 'generating'", t["project"]["id"]) == 1,
               60, "a to claim and start generating")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    assert status_of(db, item["id"])["status"] == "processing"  # nobody released it

    b = start_worker(worker_role_url, log=tmp_path / "b.log", MF_LEASE_SECONDS=LEASE,
                     MF_WORKER_ID="b")
    try:
        wait_until(lambda: status_of(db, item["id"])["status"] == "completed", 60,
                   "b to reap and complete the item")
    finally:
        assert stop(b) == 0
    state = status_of(db, item["id"])
    assert state["attempt_count"] == 2
    assert scalar(db, "SELECT count(*) FROM episodes") == 1
    episode = db.execute("SELECT * FROM episodes").fetchone()
    assert episode is not None and episode["status"] == "ready"
    assert episode["generation_attempts"] == 2
    assert "worker lost: a stopped renewing its lease" in episode["generation_errors"][0]
    assert '"item_reaped"' in (tmp_path / "b.log").read_text()


def test_frozen_worker_loses_its_lease_and_writes_nothing_when_it_resumes(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    """SIGSTOP mid-generation; another worker completes the item; SIGCONT: the frozen worker's
    write is fenced out and exactly one episode (one set of blocks, one usage row) exists."""
    t = make_tenant(db, title="slow-once:3")
    item = make_queue_item(db, t["project"])
    a = start_worker(worker_role_url, log=tmp_path / "a.log", MF_LEASE_SECONDS=LEASE,
                     MF_WORKER_ID="a")
    wait_until(lambda: scalar(db, "SELECT count(*) FROM episodes WHERE project_id = %s"
                                  " AND status = 'generating'", t["project"]["id"]) == 1,
               60, "a to claim and start generating")
    a.send_signal(signal.SIGSTOP)
    b = start_worker(worker_role_url, log=tmp_path / "b.log", MF_LEASE_SECONDS=LEASE,
                     MF_WORKER_ID="b")
    try:
        wait_until(lambda: status_of(db, item["id"])["status"] == "completed", 60,
                   "b to take over and complete")
        a.send_signal(signal.SIGCONT)
        wait_until(lambda: '"lease_lost"' in (tmp_path / "a.log").read_text(), 30,
                   "a to notice it lost the lease")
        # No sleep "to give a its chance": stopping a below waits for it to drain and exit,
        # so whatever it would write is written before the counts are read.
    finally:
        a.send_signal(signal.SIGCONT)
        assert stop(a) == 0
        assert stop(b) == 0
    assert status_of(db, item["id"])["attempt_count"] == 2
    assert scalar(db, "SELECT count(*) FROM episodes") == 1
    # b's real usage, and a's reservation booked as an estimate when the reaper took its
    # attempt (that call may have been billed).
    assert scalar(db, "SELECT count(*) FROM token_usage WHERE NOT estimated") == 1
    assert scalar(db, "SELECT count(*) FROM token_usage WHERE estimated") == 1
    assert scalar(db, "SELECT count(DISTINCT episode_id) FROM blocks") == 1
    assert scalar(db, "SELECT count(*) FROM audit_log") == 1
    assert '"item_completed"' not in (tmp_path / "a.log").read_text()


def test_heartbeat_keeps_a_long_generation_and_other_workers_leave_it_alone(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    t = make_tenant(db, title=f"slow:{2.5 * float(LEASE)}")  # two and a half leases
    item = make_queue_item(db, t["project"])
    a = start_worker(worker_role_url, log=tmp_path / "a.log", MF_LEASE_SECONDS=LEASE,
                     MF_WORKER_ID="a")
    wait_until(lambda: status_of(db, item["id"])["locked_by"] == "a", 30, "a to claim")
    b = start_worker(worker_role_url, log=tmp_path / "b.log", MF_LEASE_SECONDS=LEASE,
                     MF_WORKER_ID="b")
    try:
        wait_until(lambda: status_of(db, item["id"])["status"] == "completed", 60, "completion")
    finally:
        assert stop(a) == 0 and stop(b) == 0
    assert status_of(db, item["id"])["attempt_count"] == 1
    assert '"item_reaped"' not in (tmp_path / "b.log").read_text()
    assert '"item_completed"' in (tmp_path / "a.log").read_text()


def test_sigterm_drains_within_the_grace_and_hands_back_the_rest(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    quick = make_queue_item(db, make_tenant(db, title="slow:1")["project"])
    stuck = make_queue_item(db, make_tenant(db, title="slow:120")["project"])
    a = start_worker(worker_role_url, log=tmp_path / "a.log", MF_SHUTDOWN_GRACE="3",
                     MF_WORKER_ID="a")
    wait_until(lambda: all(status_of(db, i["id"])["status"] == "processing"
                           for i in (quick, stuck)), 30, "both items in flight")
    a.send_signal(signal.SIGTERM)
    # The stuck item sleeps 120 s: exiting at all within the wait means the 3 s grace ended it.
    assert a.wait(timeout=60) == 0
    assert status_of(db, quick["id"])["status"] == "completed"
    back = status_of(db, stuck["id"])
    # Its generation had started, so the call may have been billed: the attempt stays used and
    # its reservation is booked as an estimate.
    assert (back["status"], back["attempt_count"], back["locked_by"]) == ("pending", 1, None)
    assert scalar(db, "SELECT count(*) FROM token_usage WHERE estimated") == 1
    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue"
                      " WHERE status = 'processing'") == 0
    assert '"item_released"' in (tmp_path / "a.log").read_text()


def test_a_second_sigterm_during_the_drain_exits_at_once_with_130(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    """The operator who sends SIGTERM twice means "now": the daemon stops draining and exits
    130 without handing its item back (the reaper returns it when the lease expires)."""
    stuck = make_queue_item(db, make_tenant(db, title="slow:120")["project"])
    log = tmp_path / "a.log"
    a = start_worker(worker_role_url, log=log, MF_SHUTDOWN_GRACE="300", MF_WORKER_ID="a")
    try:
        wait_until(lambda: status_of(db, stuck["id"])["status"] == "processing", 30,
                   "the item in flight")
        a.send_signal(signal.SIGTERM)
        wait_until(lambda: '"draining"' in log.read_text(), 30, "the drain to begin")
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=60) == 130  # well inside the 300 s grace
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert '"second_signal_exiting_now"' in log.read_text()
    assert '"item_released"' not in log.read_text()
    held = status_of(db, stuck["id"])
    assert (held["status"], held["locked_by"]) == ("processing", "a")


def test_daemon_recovers_when_its_database_connections_are_killed(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    seed_many(db, orgs=4, items=40, title="slow:0.3")
    a = start_worker(worker_role_url, log=tmp_path / "a.log", MF_CONCURRENCY="4",
                     MF_LEASE_SECONDS=LEASE, MF_WORKER_ID="a")
    try:
        completed = ("SELECT count(*) FROM episode_schedule_queue WHERE status = 'completed'")
        for threshold in (5, 15):
            # Called at once, in this iteration: the lambda sees this threshold.
            wait_until(lambda: scalar(db, completed) >= threshold, 60, f"{threshold} done")
            killed = scalar(db, """
                SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND application_name LIKE 'mf-worker%%'""")
            assert killed > 0
        wait_until(lambda: scalar(db, completed) == 40, 90, "all 40 items to complete")
    finally:
        assert stop(a) == 0
    assert scalar(db, "SELECT count(*) FROM episodes WHERE status = 'ready'") == 40
    assert scalar(db, "SELECT count(DISTINCT project_id) FROM episodes") == 40
    assert a.returncode == 0


def test_poll_only_mode_through_pgbouncer_in_transaction_mode(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    """No LISTEN, no prepared statements, no session state: items complete exactly once.

    The first two are checked where they would happen, on the server: the test database logs
    every statement its sessions run (``log_statement = all``, set on the database, read back
    from the server's log), and no session of the run issued LISTEN or a named prepare."""
    pgbouncer = require_binary("pgbouncer")
    server_log = ServerLog.find(db)
    params = conninfo_to_dict(worker_role_url)
    port = _free_port()
    # Its own world-readable directory: PgBouncer runs as another user when we are root.
    home = Path(tempfile.mkdtemp(prefix="mf-pgbouncer-"))
    os.chmod(home, 0o755)
    conf = home / "pgbouncer.ini"
    (home / "users.txt").write_text(f'"{params["user"]}" ""\n')
    target = " ".join(f"{k}={v}" for k, v in {
        "host": params.get("host", "/var/run/postgresql"), "port": params.get("port", 5432),
        "dbname": params["dbname"]}.items())
    conf.write_text(
        "[databases]\n"
        f"* = {target}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir =\nauth_type = trust\nauth_file = {home / 'users.txt'}\n"
        "pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 10\n"
        f"logfile = {home / 'pgbouncer.log'}\npidfile = {home / 'pgbouncer.pid'}\n"
    )
    os.chmod(home, 0o777)
    for path in home.iterdir():
        os.chmod(path, 0o666)
    command = [pgbouncer, str(conf)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        command = ["runuser", "-u", "postgres", "--", *command]
    bouncer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        via = make_conninfo("", host="127.0.0.1", port=port, dbname=params["dbname"],
                            user=params["user"])
        wait_until(lambda: _accepts(via), 20, "pgbouncer to accept connections")
        seed_many(db, orgs=5, items=200)
        # As docs/operations.md says for a transaction-mode pooler (which refuses startup
        # options; the timeouts then come from the role).
        env = {"MF_LISTEN": "off", "MF_PREPARED_STATEMENTS": "off", "MF_CONCURRENCY": "8",
               "MF_DB_LOCK_TIMEOUT": "0", "MF_DB_STATEMENT_TIMEOUT": "0"}
        refused = subprocess.run(
            [sys.executable, "-m", "mf_worker", "run", "--burst"],
            env=worker_env(via, MF_LISTEN="off", MF_PREPARED_STATEMENTS="off"),
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
        assert refused.returncode != 0
        assert "MF_DB_LOCK_TIMEOUT" in refused.stderr and "set both to 0" in refused.stderr
        server_log.start(db)  # from here on: the run whose statements are checked
        workers = [start_worker(via, "--burst", log=tmp_path / f"w{i}.log",
                                MF_WORKER_ID=f"pooled-{i}", **env) for i in range(2)]
        codes = [w.wait(timeout=180) for w in workers]
        assert codes == [0, 0], (tmp_path / "w0.log").read_text()[-3000:]
    finally:
        bouncer.terminate()
        bouncer.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)
    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE status = 'completed'"
                      " AND attempt_count = 1") == 200
    assert scalar(db, "SELECT count(*) FROM episodes WHERE status = 'ready'") == 200
    assert scalar(db, "SELECT count(DISTINCT project_id) FROM episodes") == 200
    assert scalar(db, "SELECT count(*) FROM planning_notes WHERE status = 'incorporated'") == 200
    statements = server_log.statements(db)
    assert len(statements) > 200  # the log really shows the run's statements
    assert [s for s in statements if "LISTEN" in s.upper()] == []
    # psycopg's server-side prepares are named `_pg3_N`; unnamed statements are fine.
    assert [s for s in statements if "execute _pg3" in s or "PREPARE" in s.upper()] == []


class ServerLog:
    """The PostgreSQL server's own log file, for what a database's sessions ran.

    The Debian cluster (the one CI uses) logs to a file ``pg_lsclusters`` names; a server
    with its logging collector on names it through ``pg_current_logfile()``. Elsewhere the
    check is skipped (failed under MF_TEST_REQUIRE_ALL, as for a missing tool)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    @classmethod
    def find(cls, db: Conn) -> ServerLog:
        row = db.execute("SELECT pg_current_logfile() AS f, current_setting('data_directory')"
                         " AS d, current_setting('port') AS p").fetchone()
        assert row is not None
        candidates = [Path(row["d"]) / row["f"]] if row["f"] else []
        if shutil.which("pg_lsclusters"):
            listing = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True,
                                     text=True, check=False).stdout
            candidates += [Path(f[6]) for f in map(str.split, listing.splitlines())
                           if len(f) >= 7 and f[2] == row["p"] and f[5] == row["d"]]
        for path in candidates:
            if os.access(path, os.R_OK):
                return cls(path)
        message = "cannot read the PostgreSQL server's log to check statements server-side"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)

    def start(self, db: Conn) -> None:
        """Log every statement of the database's new sessions from now on."""
        dbname = scalar(db, "SELECT current_database()")
        db.execute(f'ALTER DATABASE "{dbname}" SET log_statement = \'all\'')
        self.offset = self.path.stat().st_size

    def statements(self, db: Conn) -> list[str]:
        """The statements logged for this database since :meth:`start`."""
        dbname = scalar(db, "SELECT current_database()")
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            text = handle.read().decode(errors="replace")
        return [line for line in text.splitlines()
                if f"@{dbname} " in line and ("statement: " in line or "execute " in line)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False
