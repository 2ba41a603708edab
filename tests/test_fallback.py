"""The fallback generator (issue #26): its settings, when it takes over, what it costs and how
it shows."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mf_worker.db import connect
from mf_worker.engine.worker import AttemptReport, Outcome, Role
from mf_worker.generation import load_fallback_generator
from mf_worker.generators.openai import LLMConfig, OpenAICompatibleGenerator
from mf_worker.settings import load_settings
from mf_worker.status import read_snapshot, render_snapshot

from .conftest import settings_for
from .factories import make_queue_item, make_tenant
from .provider import ProviderServer
from .workers import run_burst, run_single, start_worker

Conn = psycopg.Connection[dict[str, Any]]

_BOTH = {
    "MF_LLM_BASE_URL": "http://127.0.0.1:9/v1", "MF_LLM_MODEL": "primary-model",
    "MF_FALLBACK_GENERATOR": "openai",
    "MF_LLM_FALLBACK_BASE_URL": "http://127.0.0.1:10/v1", "MF_LLM_FALLBACK_MODEL": "backup-model",
    "MF_LLM_FALLBACK_MAX_TOKENS": "700", "MF_LLM_FALLBACK_TIMEOUT": "9",
}


def _cli(args: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_the_openai_fallback_instance_reads_the_MF_LLM_FALLBACK_variables() -> None:
    settings, warnings = load_settings(environ=_BOTH)
    assert warnings == []
    fallback = load_fallback_generator(settings)
    assert isinstance(fallback, OpenAICompatibleGenerator)
    assert (fallback.config.model, fallback.config.base_url) == (
        "backup-model", "http://127.0.0.1:10/v1")
    assert (fallback.config.max_tokens, fallback.config.timeout) == (700, 9.0)
    assert fallback.limit_key.endswith("#backup-model")
    assert load_fallback_generator(load_settings(environ={})[0]) is None


def test_the_fallback_key_comes_from_its_own_credential(tmp_path: Path) -> None:
    creds = tmp_path
    (creds / "mf_llm_api_key").write_text("primary-key\n")
    (creds / "mf_llm_fallback_api_key").write_text("backup-key\n")
    settings, _ = load_settings(environ={**_BOTH, "CREDENTIALS_DIRECTORY": str(creds)})
    fallback = load_fallback_generator(settings)
    assert isinstance(fallback, OpenAICompatibleGenerator)
    assert fallback.config.api_key is not None
    assert fallback.config.api_key.reveal() == "backup-key"


def test_config_shows_both_instances_with_secrets_masked() -> None:
    result = _cli(["config", "--json"], {**_BOTH, "MF_LLM_FALLBACK_API_KEY": "sk-backup"})
    assert result.returncode == 0, result.stderr
    rows = {row["variable"]: row["value"] for row in json.loads(result.stdout)}
    assert rows["MF_LLM_MODEL"] == "primary-model"
    assert rows["MF_LLM_FALLBACK_MODEL"] == "backup-model"
    assert rows["MF_FALLBACK_GENERATOR"] == "openai"
    assert rows["MF_LLM_FALLBACK_API_KEY"] == "***"
    assert "sk-backup" not in result.stdout


def test_a_bad_fallback_setting_stops_start_up_with_exit_2_naming_it() -> None:
    result = _cli(["run"], {**_BOTH, "MF_LLM_FALLBACK_TIMEOUT": "soon",
                            "MF_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mf-worker: error: MF_LLM_FALLBACK_TIMEOUT='soon': must be a number"]
    missing = {k: v for k, v in _BOTH.items() if k != "MF_LLM_FALLBACK_MODEL"}
    result = _cli(["run"], {**missing, "MF_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"})
    assert result.returncode == 2
    assert "MF_LLM_FALLBACK_MODEL is not set" in result.stderr


# --------------------------------------------------------------------------------------------
# Through the engine: two fake providers, the primary down across the lead window.

PRIMARY_MODEL = "gpt-4o-mini"
BACKUP_MODEL = "gpt-4o"  # priced in the shipped table too, differently


@pytest.fixture
def providers() -> Iterator[tuple[ProviderServer, ProviderServer]]:
    with ProviderServer(lifetime=240) as primary, ProviderServer(lifetime=240) as backup:
        yield primary, backup


def _generators(primary: ProviderServer, backup: ProviderServer
                ) -> tuple[OpenAICompatibleGenerator, OpenAICompatibleGenerator]:
    return (OpenAICompatibleGenerator(LLMConfig(primary.base_url, PRIMARY_MODEL, timeout=10)),
            OpenAICompatibleGenerator(LLMConfig(backup.base_url, BACKUP_MODEL, timeout=10)))


def _due_soon(db: Conn, count: int, *, due_in: float) -> list[str]:
    """``count`` items due ``due_in`` seconds from now, claimable at once (in the lead
    window)."""
    now = datetime.now(UTC)
    return [make_queue_item(db, make_tenant(db)["project"], run_after=now,
                            scheduled_for=now + timedelta(seconds=due_in))["id"]
            for _ in range(count)]


def _written(db: Conn, ids: list[str]) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT q.status, q.completed_at <= q.scheduled_for AS on_time,"
        " split_part(e.generator, ':', 1) AS generator, e.model"
        " FROM episode_schedule_queue AS q LEFT JOIN episodes AS e ON e.id = q.episode_id"
        " WHERE q.id = ANY(%s) ORDER BY q.id", (ids,)).fetchall()


def _run(db_url: str, db: Conn, ids: list[str], primary: OpenAICompatibleGenerator,
         fallback: OpenAICompatibleGenerator | None, timeout: float = 90, **overrides: Any
         ) -> list[AttemptReport]:
    """Bursts of the in-process worker until the items are completed (or the time is up)."""
    reports: list[AttemptReport] = []
    named = {"fallback_generator": "openai"} if fallback is not None else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports += run_burst(db_url, primary, fallback=fallback, **named, **overrides)
        if all(r["status"] == "completed" for r in _written(db, ids)):
            break
        time.sleep(0.2)
    return reports


def _fault(server: ProviderServer, fault: str, on: bool = True) -> None:
    if fault == "outage":
        server.outage(600 if on else 0)
    elif fault == "rate_limited":
        server.rate_limit(600 if on else 0, retry_after=3600)
    else:
        server.exhaust_quota(on)


@pytest.mark.parametrize("fault", ["outage", "rate_limited", "quota"])
def test_every_item_due_in_an_outage_is_written_on_time_by_the_fallback(
    db_url: str, db: Conn, providers: tuple[ProviderServer, ProviderServer], fault: str,
    captured_logs: io.StringIO,
) -> None:
    """The primary answers 503 / 429 with a 1-hour Retry-After / insufficient_quota for the
    whole lead window: every item due in it is finished before its instant, written by the
    fallback (its model recorded on the episode, its usage booked under that model); the
    primary is not called again once it is known to be held or failing."""
    primary_server, backup_server = providers
    primary, backup = _generators(primary_server, backup_server)
    _fault(primary_server, fault)
    ids = _due_soon(db, 3, due_in=60)
    reports = _run(db_url, db, ids, primary, backup)
    assert _written(db, ids) == [
        {"status": "completed", "on_time": True, "generator": "fallback",
         "model": BACKUP_MODEL}] * 3
    assert backup_server.counts()["accepted"] == 3 and primary_server.counts()["accepted"] == 0
    # Each item tries the primary once at most (the first wave, before the failure is
    # known); after that a held key is read, not called, and a failing one is left alone.
    assert primary_server.calls <= len(ids)
    models = {r["model"] for r in db.execute(
        "SELECT model FROM token_usage WHERE episode_id IS NOT NULL")}
    assert models == {BACKUP_MODEL}
    assert sum(r.role is Role.FALLBACK and r.outcome is Outcome.SUCCESS for r in reports) == 3
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()
             if '"item_moved_to_fallback"' in line]
    assert len(lines) == 3 and all(line["due_in_seconds"] <= 300 for line in lines)
    completed = [json.loads(line) for line in captured_logs.getvalue().splitlines()
                 if '"item_completed"' in line]
    assert {(line["generator"], line["model"]) for line in completed} == {
        ("fallback", BACKUP_MODEL)}
    status = _status(db_url)
    assert f"fallback:openai  {BACKUP_MODEL}       3" in status, status


def _status(db_url: str) -> str:
    """What `mf-worker status` prints."""
    async def snapshot() -> str:
        conn = await connect(settings_for(db_url))
        async with conn:
            return render_snapshot(await read_snapshot(conn, default_limit_gbp=Decimal(50)))
    return asyncio.run(snapshot())


def test_when_the_primary_recovers_the_next_items_go_to_it(
    db_url: str, db: Conn, providers: tuple[ProviderServer, ProviderServer]
) -> None:
    primary_server, backup_server = providers
    primary, backup = _generators(primary_server, backup_server)
    primary_server.outage(600)
    first = _due_soon(db, 2, due_in=60)
    _run(db_url, db, first, primary, backup)
    assert {r["generator"] for r in _written(db, first)} == {"fallback"}
    primary_server.outage(0)
    after = _due_soon(db, 2, due_in=60)
    _run(db_url, db, after, primary, backup)
    assert _written(db, after) == [
        {"status": "completed", "on_time": True, "generator": "primary",
         "model": PRIMARY_MODEL}] * 2
    assert backup_server.counts()["accepted"] == 2


def test_items_with_time_to_spare_wait_for_the_primary_until_their_decision_point(
    db_url: str, db: Conn, providers: tuple[ProviderServer, ProviderServer]
) -> None:
    """An item due in 10 minutes is not moved: held by a 1-hour Retry-After (clamped to 15
    minutes), it comes back at its decision point (MF_FALLBACK_BEFORE before its instant, in 5
    minutes), not after the provider's reset, which is past its instant."""
    primary_server, backup_server = providers
    primary, backup = _generators(primary_server, backup_server)
    primary_server.rate_limit(600, retry_after=3600)
    [item] = _due_soon(db, 1, due_in=600)
    run_burst(db_url, primary, fallback=backup, fallback_generator="openai")
    row = db.execute("SELECT status, run_after, scheduled_for FROM episode_schedule_queue"
                     " WHERE id = %s", (item,)).fetchone()
    assert row is not None and row["status"] == "pending"
    # (its delay is counted from the worker's clock; the database adds it to its own, a few
    # milliseconds later)
    assert row["run_after"] <= row["scheduled_for"] - timedelta(seconds=299)
    assert backup_server.counts()["accepted"] == 0


def test_without_a_fallback_an_item_waits_for_the_provider_as_before(
    db_url: str, db: Conn, providers: tuple[ProviderServer, ProviderServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No MF_FALLBACK_GENERATOR: an item due in a minute, refused with a long Retry-After,
    waits for the provider's reset (late), exactly as before."""
    primary_server, backup_server = providers
    monkeypatch.setenv("MF_LLM_BASE_URL", primary_server.base_url)
    monkeypatch.setenv("MF_LLM_MODEL", PRIMARY_MODEL)
    primary_server.rate_limit(600, retry_after=3600)
    [item] = _due_soon(db, 1, due_in=60)
    assert run_single(db_url, item, generator="openai") is Outcome.DEFERRED
    row = db.execute("SELECT status, run_after, scheduled_for"
                     " FROM episode_schedule_queue WHERE id = %s", (item,)).fetchone()
    assert row is not None and row["status"] == "pending"
    assert row["run_after"] > row["scheduled_for"]  # late: the provider's reset decides
    assert backup_server.calls == 0


def test_the_daily_limit_holds_across_both_providers_when_workers_race(
    db_url: str, db: Conn
) -> None:
    """Two workers race for one organisation's items while the primary is down: every item
    goes to the fallback, whose model (gpt-4o) costs 17 times the primary's. Each attempt
    reserves the fallback's own worst case, so the day's spend never passes the limit (with
    the primary's estimate, the reservations would let about 17 times too many start)."""
    from .factories import make_org, make_project, make_user

    limit = Decimal("0.05")
    org = make_org(db, daily_cost_limit_gbp=str(limit))
    user = make_user(db, org)
    now = datetime.now(UTC)
    for _ in range(12):
        make_queue_item(db, make_project(db, user), run_after=now,
                        scheduled_for=now + timedelta(seconds=120))
    # Long replies: each answered call costs about £0.012 at the fallback's prices.
    with ProviderServer(lifetime=240) as primary_server, \
            ProviderServer(lifetime=240, completion_tokens=1400) as backup_server:
        primary, backup = _generators(primary_server, backup_server)
        primary_server.outage(600)

        def burst() -> None:
            run_burst(db_url, primary, fallback=backup, fallback_generator="openai",
                      concurrency=3)

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            racers = [threading.Thread(target=burst) for _ in range(2)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join()
            # Items refused only by reservations in flight wait a little: bring them forward.
            waiting = db.execute(
                "UPDATE episode_schedule_queue SET run_after = now() WHERE status = 'pending'"
                " AND organization_id = %s AND scheduled_for <= now() + interval '5 minutes'"
                " RETURNING id", (org["id"],)).fetchall()
            if not waiting:
                break
    statuses = {r["status"]: r["n"] for r in db.execute(
        "SELECT status, count(*) AS n FROM episode_schedule_queue WHERE organization_id = %s"
        " AND scheduled_for <= now() + interval '5 minutes' GROUP BY status", (org["id"],))}
    assert statuses.get("completed", 0) >= 1 and statuses.get("blocked", 0) >= 1, statuses
    daily = db.execute("SELECT * FROM token_usage_daily WHERE organization_id = %s",
                       (org["id"],)).fetchone()
    assert daily is not None
    assert 0 < daily["total_cost_gbp"] <= limit
    assert daily["reserved_gbp"] == 0
    assert daily["total_cost_gbp"] == db.execute(
        "SELECT sum(cost_gbp) AS s FROM token_usage WHERE organization_id = %s",
        (org["id"],)).fetchone()["s"]  # type: ignore[index]
    assert {r["model"] for r in db.execute(
        "SELECT DISTINCT model FROM token_usage WHERE organization_id = %s",
        (org["id"],))} == {BACKUP_MODEL}


@pytest.mark.xdist_group("processes")
def test_a_worker_process_configured_by_its_environment_uses_the_fallback(
    db_url: str, db: Conn, providers: tuple[ProviderServer, ProviderServer], tmp_path: Path
) -> None:
    """`mf-worker run --burst` with MF_FALLBACK_GENERATOR=openai and MF_LLM_FALLBACK_*: the
    primary is down, the item due in a minute is written by the fallback's model, and the
    log says why it moved."""
    primary_server, backup_server = providers
    primary_server.outage(600)
    [item] = _due_soon(db, 1, due_in=60)
    log = tmp_path / "worker.log"
    worker = start_worker(
        db_url, "--burst", log=log, MF_GENERATOR="openai",
        MF_LLM_BASE_URL=primary_server.base_url, MF_LLM_MODEL=PRIMARY_MODEL,
        MF_FALLBACK_GENERATOR="openai", MF_LLM_FALLBACK_BASE_URL=backup_server.base_url,
        MF_LLM_FALLBACK_MODEL=BACKUP_MODEL, MF_LLM_FALLBACK_TIMEOUT="10")
    assert worker.wait(timeout=120) == 0, log.read_text()
    assert _written(db, [item]) == [{"status": "completed", "on_time": True,
                                     "generator": "fallback", "model": BACKUP_MODEL}]
    full = db.execute("SELECT e.generator FROM episodes AS e JOIN episode_schedule_queue AS q"
                      " ON q.episode_id = e.id WHERE q.id = %s", (item,)).fetchone()
    assert full == {"generator": "fallback:openai"}
    moves = [json.loads(line) for line in log.read_text().splitlines()
             if '"item_moved_to_fallback"' in line]
    assert [m["reason"] for m in moves] == ["transient"]
