"""Flow control through the whole engine, against `tests.provider.ProviderServer` (a real HTTP
server on loopback that enforces requests per minute like a hosted provider):

* a provider that answers 503 for a while (the issue's 20 s, scaled down) costs no item its
  episode: transient failures back off until the deadline instead of using up attempts;
* two real `mf-worker run` processes share one limit through the database: paced together
  at 95 % of it, they draw no 429 from a provider that would refuse them both at full speed;
* an exhausted quota pauses the key, says so once, and the items wait instead of failing.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mf_worker.engine.worker import Outcome

from .factories import make_queue_item, make_tenant
from .provider import ProviderServer
from .workers import run_burst, run_single, start_worker, wait_until

Conn = psycopg.Connection[dict[str, Any]]
MODEL = "gpt-4o-mini"
OPENAI = "openai"


@pytest.fixture
def provider_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProviderServer]:
    """A provider with no rate limit, and the MF_LLM_* variables pointing at it."""
    with ProviderServer(lifetime=120) as server:
        for name in ("MF_LLM_API_KEY", "MF_LLM_API_KEY_FILE", "CREDENTIALS_DIRECTORY",
                     "MF_LLM_MAX_TOKENS", "MF_LLM_TEMPERATURE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MF_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("MF_LLM_MODEL", MODEL)
        monkeypatch.setenv("MF_LLM_TIMEOUT", "10")
        yield server


def statuses(db: Conn) -> dict[str, int]:
    return {r["status"]: r["n"] for r in db.execute(
        "SELECT status, count(*) AS n FROM episode_schedule_queue"
        " WHERE scheduled_for <= now() GROUP BY status")}


def test_a_provider_answering_503_for_a_while_costs_no_item_its_episode(
    db_url: str, db: Conn, provider_env: ProviderServer
) -> None:
    """The issue's 503-for-20-seconds incident, scaled down to 5 s: with the old count of
    3 attempts (1 s, then 2 s of backoff) every item failed for good; now every item is
    retried with backoff until the provider is back, and writes its episode."""
    items = [make_queue_item(db, make_tenant(db)["project"]) for _ in range(4)]
    provider_env.outage(5.0)
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + 60
    while statuses(db).get("completed", 0) < len(items) and time.monotonic() < deadline:
        outcomes += [r.outcome for r in run_burst(db_url, OPENAI, max_attempts=3)]
        assert statuses(db).get("failed", 0) == 0
        time.sleep(0.2)
    assert statuses(db) == {"completed": 4}
    assert provider_env.counts()["unavailable"] >= 4  # the incident really happened
    assert Outcome.RETRY in outcomes and Outcome.FAILED not in outcomes
    retried = db.execute("SELECT min(retry_count) AS low FROM episode_schedule_queue"
                         " WHERE status = 'completed'").fetchone()
    assert retried is not None and retried["low"] >= 1


def test_two_worker_processes_share_one_limit_and_draw_no_429(
    db_url: str, db: Conn, tmp_path: Path
) -> None:
    """60 requests a minute at the provider (one a second, three held). Two processes at
    concurrency 4 would send eight calls at once on their own; sharing the database's bucket
    they start with one or two and go on at 0.95 a second together."""
    items = [make_queue_item(db, make_tenant(db)["project"]) for _ in range(6)]
    with ProviderServer(requests_per_minute=60, burst_seconds=3, lifetime=120) as server:
        env = {"MF_GENERATOR": OPENAI, "MF_LLM_BASE_URL": server.base_url,
               "MF_LLM_MODEL": MODEL, "MF_LLM_TIMEOUT": "10", "MF_CONCURRENCY": "4",
               "MF_LLM_REQUESTS_PER_MINUTE": "60"}
        workers = [start_worker(db_url, log=tmp_path / f"w{n}.log", MF_WORKER_ID=f"w{n}",
                                **env) for n in range(2)]
        try:
            wait_until(lambda: statuses(db).get("completed", 0) == len(items), 60,
                       "every item to complete")
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                proc.wait(timeout=60)
        counts = server.counts()
    assert statuses(db) == {"completed": 6}
    assert counts["accepted"] == 6 and counts["rate_limited"] == 0
    assert all(proc.returncode == 0 for proc in workers)


def test_an_exhausted_quota_pauses_the_key_says_so_once_and_the_item_waits(
    db_url: str, db: Conn, provider_env: ProviderServer, captured_logs: io.StringIO
) -> None:
    first = make_queue_item(db, make_tenant(db)["project"])
    second = make_queue_item(db, make_tenant(db)["project"])
    provider_env.exhaust_quota()
    assert run_single(db_url, first["id"], generator=OPENAI) is Outcome.DEFERRED
    state = db.execute("SELECT * FROM episode_schedule_queue WHERE id = %s",
                       [first["id"]]).fetchone()
    assert state is not None
    assert (state["status"], state["attempt_count"], state["deferred_reason"]) == (
        "pending", 0, "quota_exhausted")
    hold = db.execute("SELECT * FROM provider_limits").fetchone()
    assert hold is not None and hold["cooldown_reason"] == "quota_exhausted"
    assert hold["quota_pauses"] == 1
    assert 590 <= (state["run_after"] - state["last_attempt_at"]).total_seconds() <= 610

    # Another worker's item waits too, without calling the provider during the pause, and
    # nobody is told twice.
    assert run_single(db_url, second["id"], generator=OPENAI) is Outcome.DEFERRED
    assert provider_env.counts()["quota_rejected"] == 1
    said = [json.loads(line) for line in captured_logs.getvalue().splitlines()
            if '"provider_quota_exhausted"' in line]
    assert len(said) == 1 and said[0]["limit_key"].endswith(f"#{MODEL}")
    assert statuses(db) == {"pending": 2}


def test_status_shows_items_waiting_on_the_provider_and_the_keys_on_hold(
    db_url: str, db: Conn
) -> None:
    import asyncio
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from mf_worker.db import connect
    from mf_worker.flow import cool_down
    from mf_worker.status import read_snapshot, render_snapshot

    from .conftest import settings_for

    later = datetime.now(UTC) + timedelta(minutes=5)
    for reason in ("rate_limited", "rate_limited", "quota_exhausted"):
        make_queue_item(db, make_tenant(db)["project"], run_after=later,
                        deferred_reason=reason)

    async def snapshot() -> str:
        conn = await connect(settings_for(db_url))
        async with conn:
            await cool_down(conn, "openai:http://llm/v1#m", seconds=600,
                            reason="quota_exhausted")
            return render_snapshot(await read_snapshot(conn, default_limit_gbp=Decimal(50)))

    text = asyncio.run(snapshot())
    assert "items waiting on the provider or a backoff (no attempt used):" in text
    assert any(line.split()[:2] == ["rate_limited", "2"] for line in text.splitlines())
    assert any(line.split()[:2] == ["quota_exhausted", "1"] for line in text.splitlines())
    held = [line for line in text.splitlines() if "openai:http://llm/v1#m" in line]
    assert len(held) == 1 and "quota_exhausted until" in held[0] and "top up" in held[0]


def test_a_lost_worker_is_counted_apart_from_transient_retries(db_url: str, db: Conn) -> None:
    """Five calls failed transiently (the provider was down), then the worker of the sixth
    died: the reaper returns the item, since only one worker was lost on it; it fails only
    when MF_MAX_ATTEMPTS workers were lost on it."""
    import asyncio

    from mf_worker import queue
    from mf_worker.db import open_pool
    from mf_worker.maintenance.reaper import Reaper, ReaperConfig

    from .conftest import settings_for

    item = make_queue_item(db, make_tenant(db)["project"], attempt_count=5, retry_count=5)

    async def lose_a_worker() -> list[str]:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            async with pool.connection() as conn:
                await conn.execute("UPDATE episode_schedule_queue SET run_after = now()")
                assert len(await queue.claim_due_items(conn, worker="ghost", limit=1,
                                                       lease_seconds=60)) == 1
            db.execute("UPDATE episode_schedule_queue"
                       " SET lease_expires_at = now() - interval '1 s'")
            reaped = await Reaper(pool, ReaperConfig(lease_seconds=60, max_attempts=3)).run_once()
            return [r.status for r in reaped]
        finally:
            await pool.close()

    assert asyncio.run(lose_a_worker()) == ["pending"]
    assert asyncio.run(lose_a_worker()) == ["pending"]
    assert asyncio.run(lose_a_worker()) == ["failed"]
    state = db.execute("SELECT attempt_count, lost_count FROM episode_schedule_queue"
                       " WHERE id = %s", [item["id"]]).fetchone()
    assert state == {"attempt_count": 8, "lost_count": 3}
