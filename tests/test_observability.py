"""Metrics, health and logs, read the way operators read them: from a running daemon's endpoint,
through promtool and a real Prometheus server, and from its JSON log lines. The daemons log in
as the documented least-privilege role, so the queue depth they export is read through
row-level security as in production."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .conftest import require_binary
from .factories import make_project, make_queue_item, make_tenant
from .workers import http_get, port_of, start_worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

Conn = psycopg.Connection[dict[str, Any]]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        got = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
        if got == wanted:
            return float(match.group(3))
    return 0.0


def scalar(conn: Conn, sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return next(iter(row.values()))


def with_password(url: str, password: str) -> str:
    params = conninfo_to_dict(url)
    params.setdefault("host", "127.0.0.1")
    params["password"] = password  # trust auth ignores it; the logs must never show it
    return make_conninfo("", **params)


def test_scraped_metrics_move_by_the_right_amounts_and_pass_promtool(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    t = make_tenant(db)
    for title in ["ok"] * 10 + ["permanent"] * 2 + ["flaky:1"]:
        make_queue_item(db, make_project(db, t["user"], title=title))
    log = tmp_path / "w.log"
    worker = start_worker(with_password(worker_role_url, "s3cr3t-pw"), log=log, MF_CONCURRENCY="4")
    scraped: list[str] = []

    def settled() -> bool:
        # The queue gauges are read from the database and cached for 5 s, and an attempt is
        # counted (and leaves the in-flight gauge) just after its write commits: scrape until
        # the daemon has caught up instead of sleeping past the cache on a hopeful clock.
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        scraped[:] = [text] if status == 200 else []
        return bool(scraped) and (sample(text, "mf_worker_queue_items", status="completed"),
                                  sample(text, "mf_worker_queue_items", status="failed"),
                                  sample(text, "mf_worker_item_duration_seconds_count"),
                                  sample(text, "mf_worker_in_flight_items")) == (11, 2, 14, 0)

    try:
        port = port_of(log)
        wait_until(lambda: scalar(db, "SELECT count(*) FROM episode_schedule_queue"
                                      " WHERE status IN ('completed', 'failed')") == 13,
                   60, "all items to finish")
        wait_until(settled, 60, "the metrics to show the finished items")
    finally:
        assert stop(worker) == 0
    text = scraped[0]
    assert sample(text, "mf_worker_attempts_total", outcome="success") == 11
    assert sample(text, "mf_worker_attempts_total", outcome="failed") == 2
    assert sample(text, "mf_worker_attempts_total", outcome="retry") == 1
    assert sample(text, "mf_worker_failures_total", reason="generator_permanent") == 2
    assert sample(text, "mf_worker_failures_total", reason="generator_retryable") == 1
    assert sample(text, "mf_worker_failures_total", reason="timeout") == 0
    assert sample(text, "mf_worker_generation_duration_seconds_count") == 14
    assert sample(text, "mf_worker_item_duration_seconds_count") == 14
    assert sample(text, "mf_worker_queue_lag_seconds_count") == 14
    prompt = scalar(db, "SELECT sum(prompt_tokens) FROM token_usage")
    assert sample(text, "mf_worker_tokens_total", model="template", kind="prompt") == prompt
    assert sample(text, "mf_worker_cost_gbp_total", model="template") == 0
    assert sample(text, "mf_worker_queue_items", status="completed") == 11
    assert sample(text, "mf_worker_queue_items", status="failed") == 2
    assert sample(text, "mf_worker_concurrency_items") == 4
    assert sample(text, "mf_worker_in_flight_items") == 0
    assert "mf_worker_build_info{" in text and "process_resident_memory_bytes" in text
    assert "mf_worker_queue_oldest_due_age_seconds" in text
    # The claim loop's tick moved (a Unix time), and the scheduler's count moved: the
    # tenant's own project had no item, so only the scheduler can have given it one (the
    # two failed projects may or may not have had their pass yet).
    assert sample(text, "mf_worker_claim_loop_last_tick_timestamp_seconds") > 1.7e9
    assert scalar(db, "SELECT count(*) FROM episode_schedule_queue WHERE project_id = %s",
                  t["project"]["id"]) == 1
    assert 1 <= sample(text, "mf_worker_scheduler_items_created_total") <= 3

    # The secrets and the log context first: they need nothing installed.
    logs = log.read_text()
    assert "s3cr3t-pw" not in logs
    completed = 0
    for line in logs.splitlines():
        entry = json.loads(line)
        if entry["event"] in ("item_completed", "attempt_failed", "generation_started"):
            assert {"queue_id", "project_id", "organization_id", "attempt"} <= set(entry), line
            completed += entry["event"] == "item_completed"
    # item_completed is said by the log's subscription to the event hub (event_log), with the
    # context the item's task bound.
    assert completed >= 11

    promtool = require_binary("promtool")  # skips (fails in CI) without it, after the above
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stderr


def test_a_real_prometheus_scrapes_the_daemon(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    prometheus = require_binary("prometheus")
    make_queue_item(db, make_tenant(db)["project"])
    log = tmp_path / "w.log"
    worker = start_worker(worker_role_url, log=log)
    home = Path(tempfile.mkdtemp(prefix="mf-prometheus-"))
    try:
        port = port_of(log)
        (home / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: mf-worker\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        prom_port = _free_port()
        server = subprocess.Popen(
            [prometheus, f"--config.file={home / 'prometheus.yml'}",
             f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            query = (f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                     "mf_worker_attempts_total%7Boutcome%3D%22success%22%7D")
            results: list[Any] = []

            def answered() -> bool:
                try:
                    status, body = http_get(query)
                except OSError:
                    return False
                results[:] = json.loads(body)["data"]["result"] if status == 200 else []
                return bool(results) and results[0]["value"][1] == "1"

            wait_until(answered, 60, "Prometheus to return the attempt counter")
        finally:
            server.terminate()
            server.wait(timeout=20)
    finally:
        assert stop(worker) == 0
        shutil.rmtree(home, ignore_errors=True)
    assert results[0]["metric"]["job"] == "mf-worker"


def test_healthz_turns_503_while_the_claim_loop_is_wedged(
    worker_role_url: str, db: Conn, tmp_path: Path
) -> None:
    log = tmp_path / "w.log"
    worker = start_worker(worker_role_url, log=log, MF_HEALTH_STALL_SECONDS="1", MF_CONCURRENCY="1")
    try:
        port = port_of(log)
        healthz = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: http_get(healthz)[0] == 200, 20, "a healthy start")
        # One transaction: the running daemon's scheduler would otherwise give the new project
        # its own first item before this one is inserted (the one-open-item index refuses ours).
        with db.transaction():
            make_queue_item(db, make_tenant(db, title="wedge:6")["project"])
        wait_until(lambda: http_get(healthz)[0] == 503, 20, "/healthz to report the stall")
        _status, body = http_get(healthz)
        assert json.loads(body)["status"] == "stalled"
        wait_until(lambda: http_get(healthz)[0] == 200, 30, "recovery after the wedge")
    finally:
        assert stop(worker) == 0


def test_readyz_follows_the_database(
    worker_role_url: str, db: Conn, pg_admin_url: str, tmp_path: Path
) -> None:
    admin = psycopg.connect(pg_admin_url, autocommit=True)
    log = tmp_path / "w.log"
    worker = start_worker(worker_role_url, log=log)
    dbname = conninfo_to_dict(worker_role_url)["dbname"]
    try:
        readyz = f"http://127.0.0.1:{port_of(log)}/readyz"
        wait_until(lambda: http_get(readyz)[0] == 200, 20, "ready")
        assert json.loads(http_get(readyz)[1])["status"] == "ready"
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE datname = %s AND application_name LIKE 'mf-worker%%'", [dbname])
        wait_until(lambda: http_get(readyz)[0] == 503, 30, "/readyz to notice")
        assert json.loads(http_get(readyz)[1])["status"] == "not ready"
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        wait_until(lambda: http_get(readyz)[0] == 200, 60, "/readyz to recover")
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        admin.close()
        assert stop(worker) == 0


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
