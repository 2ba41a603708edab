"""The engine in one process: the final write, retries, permanent failures, bad output, bad data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from mf_worker.backoff import ITEM_RETRY
from mf_worker.engine.worker import Outcome

from .factories import (
    item_state,
    make_note,
    make_project,
    make_queue_item,
    make_tenant,
    make_user,
    one,
)
from .workers import ROOT, run_burst, run_single, worker_env

Conn = psycopg.Connection[dict[str, Any]]


def utcnow() -> datetime:
    """Read the clock inside each test, never at import: collection and run can be minutes
    apart (a whole suite on a busy machine), across 09:00 London or midnight."""
    return datetime.now(UTC)


def make_due(conn: Conn) -> None:
    conn.execute("UPDATE episode_schedule_queue SET run_after = now() WHERE status = 'pending'")


def test_success_writes_everything_in_one_go(db_url: str, db: Conn) -> None:
    """Episode, blocks, usage, notes, memory, audit, event, completion and the next item."""
    t = make_tenant(db, cadence={"mode": "weekly", "days": [1]})
    notes = [make_note(db, t["project"], note=n) for n in ("More on policy", "Less jargon")]
    before = utcnow()
    item = make_queue_item(db, t["project"], scheduled_for=before - timedelta(minutes=5))

    reports = run_burst(db_url)

    assert [r.outcome for r in reports] == [Outcome.SUCCESS]
    done = item_state(db, item["id"])
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["locked_by"] is None and done["attempt_count"] == 1
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", done["episode_id"])
    assert (episode["status"], episode["sequence_number"], episode["generation_attempts"]) == (
        "ready", 1, 1)
    assert episode["title"] == reports[0].result.title  # type: ignore[union-attr]
    blocks = db.execute("SELECT * FROM blocks WHERE episode_id = %s ORDER BY position",
                        [episode["id"]]).fetchall()
    assert [b["position"] for b in blocks] == list(range(len(blocks))) and len(blocks) >= 2
    usage = one(db, "SELECT * FROM token_usage WHERE episode_id = %s", episode["id"])
    assert usage["operation"] == "episode_generation" and usage["model"] == "template"
    assert usage["total_tokens"] > 0 and usage["cost_gbp"] == 0
    daily = one(db, "SELECT * FROM token_usage_daily WHERE organization_id = %s",
                t["org"]["id"])
    assert daily["total_tokens"] == usage["total_tokens"] and daily["episode_count"] == 1
    for note in notes:
        row = one(db, "SELECT status, episode_id, processed_at FROM planning_notes WHERE id = %s",
                  note["id"])
        assert row["status"] == "incorporated" and row["episode_id"] == episode["id"]
    assert one(db, "SELECT count(*) AS n FROM agent_memory")["n"] >= 1
    audit = one(db, "SELECT * FROM audit_log WHERE action = 'episode.generate'")
    assert audit["resource_id"] == episode["id"] and json.loads(audit["new_value"])["blocks"]
    event = one(db, "SELECT * FROM user_events WHERE event_type = 'episode_generated'")
    assert event["user_id"] == t["user"]["id"]
    nxt = one(db, "SELECT * FROM episode_schedule_queue WHERE status = 'pending'")
    assert nxt["project_id"] == t["project"]["id"] and nxt["scheduled_for"] > before
    assert nxt["scheduled_for"].astimezone(UTC).weekday() == 0  # Monday (London, 09:00)
    project = one(db, "SELECT next_scheduled_at FROM projects WHERE id = %s", t["project"]["id"])
    assert project["next_scheduled_at"] == nxt["scheduled_for"]


def test_missed_slots_are_not_caught_up_after_an_outage(db_url: str, db: Conn) -> None:
    """An item due ten days ago (daily cadence) is followed by one in the future, not ten."""
    t = make_tenant(db, cadence={"mode": "daily"})
    before = utcnow()
    make_queue_item(db, t["project"], scheduled_for=before - timedelta(days=10))
    run_burst(db_url)
    after = utcnow()
    pending = db.execute(
        "SELECT scheduled_for FROM episode_schedule_queue WHERE status = 'pending'").fetchall()
    # The worker read its clock between `before` and `after`; the next 09:00 follows it
    # within a day, whichever side of 09:00 London the run fell.
    assert len(pending) == 1 and before < pending[0]["scheduled_for"] <= after + timedelta(days=1)


def test_retry_then_success_keeps_the_first_error_in_the_episode_history(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db, title="flaky:1")
    item = make_queue_item(db, t["project"])

    first = run_burst(db_url)
    assert [r.outcome for r in first] == [Outcome.RETRY]
    state = item_state(db, item["id"])
    assert state["status"] == "pending" and state["attempt_count"] == 1
    assert "provider overloaded" in state["last_error"]
    assert 0.8 <= backoff_of(state) <= 1.2  # attempt 1 backs off 1 s ± 20 %

    make_due(db)
    second = run_burst(db_url)
    assert [r.outcome for r in second] == [Outcome.SUCCESS]
    state = item_state(db, item["id"])
    assert (state["status"], state["attempt_count"]) == ("completed", 2)
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", state["episode_id"])
    assert episode["status"] == "ready" and episode["generation_attempts"] == 2
    assert len(episode["generation_errors"]) == 1
    assert episode["generation_errors"][0].startswith("attempt 1: provider overloaded")
    assert one(db, "SELECT count(*) AS n FROM episodes")["n"] == 1


def backoff_of(state: dict[str, Any]) -> float:
    """Seconds the failure write put between its own transaction and ``run_after``.

    ``run_after`` is ``now() + delay`` and the touch trigger stamps ``updated_at = now()`` in
    the same transaction, so this is the delay the worker chose, exactly, however long the
    attempt took on a busy machine (``last_attempt_at`` is the claim, earlier by that long)."""
    return float((state["run_after"] - state["updated_at"]).total_seconds())


def test_retry_after_from_the_provider_is_honoured_and_the_item_comes_back(
    db_url: str, db: Conn
) -> None:
    """A provider's retry_after longer than the backoff sets the delay: the item is not claimed
    before it, and once due it comes back and succeeds on attempt 2."""
    t = make_tenant(db, title="rate-limited:30")
    item = make_queue_item(db, t["project"])
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.RETRY]
    state = item_state(db, item["id"])
    assert backoff_of(state) == 30.0  # not the 1 s backoff
    assert "429" in state["last_error"]

    assert run_burst(db_url) == []  # not due yet: nothing is claimed
    make_due(db)
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.SUCCESS]
    assert (item_state(db, item["id"])["status"], item_state(db, item["id"])["attempt_count"]
            ) == ("completed", 2)


def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db, title="rate-limited:0.1")
    item = make_queue_item(db, t["project"])
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.RETRY]
    assert 0.8 <= backoff_of(item_state(db, item["id"])) <= 1.2  # the 1 s backoff ± 20 %


def test_transient_failures_retry_past_max_attempts_until_the_retry_deadline(
    db_url: str, db: Conn
) -> None:
    """A provider incident delays an episode instead of cancelling it: transient failures are
    bounded by MF_RETRY_DEADLINE after the first pick-up, not by MF_MAX_ATTEMPTS."""
    t = make_tenant(db, title="fail-always")
    item = make_queue_item(db, t["project"])
    outcomes = []
    for _ in range(4):
        outcomes += [r.outcome for r in run_burst(db_url, max_attempts=3)]
        make_due(db)
    assert outcomes == [Outcome.RETRY] * 4
    state = item_state(db, item["id"])
    assert (state["status"], state["attempt_count"], state["retry_count"]) == ("pending", 4, 4)
    assert state["deferred_reason"] == "transient"

    # Four hours (the default deadline) after the first pick-up, the next failure is the last.
    db.execute("UPDATE episode_schedule_queue SET picked_up_at = now() - interval '4 h 1 s'")
    assert [r.outcome for r in run_burst(db_url, max_attempts=3)] == [Outcome.FAILED]
    state = item_state(db, item["id"])
    assert state["status"] == "failed" and state["attempt_count"] == 5
    assert state["last_error"].startswith(
        "gave up after 5 transient failures (MF_RETRY_DEADLINE or the project's next episode "
        "reached): upstream 503 on attempt 5")
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", state["episode_id"])
    assert episode["status"] == "failed" and episode["generation_attempts"] == 5
    assert len(episode["generation_errors"]) == 5


def test_a_transient_failure_is_not_retried_past_the_projects_next_occurrence(
    db_url: str, db: Conn
) -> None:
    """The next retry (eight failures in: about four minutes of backoff) would come after the
    project's next episode is due (daily, in 100 s): the item fails instead of overlapping."""
    t = make_tenant(db, title="fail-always")
    due = datetime.now(UTC) - timedelta(days=1) + timedelta(seconds=100)
    zone_local = due.astimezone(__import__("zoneinfo").ZoneInfo("Europe/London"))
    item = make_queue_item(db, t["project"], scheduled_for=due, run_after=datetime.now(UTC),
                           retry_count=8, metadata=Jsonb({
                               "cadence": {"mode": "daily", "days": []},
                               "user_timezone": "Europe/London",
                               "delivery_time": zone_local.time().isoformat()}))
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.FAILED]
    state = item_state(db, item["id"])
    assert state["status"] == "failed" and state["retry_count"] == 9
    assert "next episode" in state["last_error"]


@pytest.mark.parametrize(
    ("title", "expected"),
    [("permanent", "400 Bad Request: content refused"),
     ("raises", "generator raised KeyError: 'choices'")],
)
def test_permanent_errors_fail_after_one_attempt(
    db_url: str, db: Conn, title: str, expected: str
) -> None:
    t = make_tenant(db, title=title)
    item = make_queue_item(db, t["project"])
    assert [r.outcome for r in run_burst(db_url)] == [Outcome.FAILED]
    state = item_state(db, item["id"])
    assert (state["status"], state["attempt_count"]) == ("failed", 1)
    assert expected in state["last_error"]


INVALID_CASES = {
    "empty-title": "title",
    "no-blocks": "blocks",
    "nul": "NUL",
    "confidence-7": "confidence",
    "confidence-nan": "confidence",
    "negative-tokens": "prompt_tokens",
    "huge": "MF_MAX_EPISODE_BYTES",
    "foreign-note": "note_of_someone_else",
    "not-a-result": "GenerationResult",
}


def test_every_invalid_output_fails_its_item_only(db_url: str, db: Conn) -> None:
    """Each kind of garbage fails its own item with a clear error; a good item still completes
    in the same run, and nothing of the bad ones is written."""
    org_user = make_tenant(db)
    items = {}
    for kind in INVALID_CASES:
        project = make_project(db, org_user["user"], title=f"invalid:{kind}")
        items[kind] = make_queue_item(db, project)["id"]
    good = make_queue_item(db, org_user["project"])["id"]

    run_burst(db_url, concurrency=4)

    for kind, needle in INVALID_CASES.items():
        state = item_state(db, items[kind])
        assert state["status"] == "failed", kind
        assert state["attempt_count"] == 1, kind
        assert state["last_error"].startswith("invalid output: "), state["last_error"]
        assert needle in state["last_error"], (kind, state["last_error"])
    assert item_state(db, good)["status"] == "completed"
    assert one(db, "SELECT count(*) AS n FROM episodes WHERE status = 'ready'")["n"] == 1
    assert one(db, "SELECT count(*) AS n FROM blocks b JOIN episodes e ON e.id = b.episode_id"
                   " WHERE e.status <> 'ready'")["n"] == 0
    # The calls were billed all the same: their usage is booked against their failed episodes
    # (#14), one real row for the good item's ready episode.
    assert one(db, "SELECT count(*) AS n FROM token_usage t JOIN episodes e"
                   " ON e.id = t.episode_id WHERE e.status = 'ready'")["n"] == 1
    assert one(db, "SELECT count(*) AS n FROM token_usage t LEFT JOIN episodes e"
                   " ON e.id = t.episode_id WHERE e.status IS DISTINCT FROM 'ready'"
                   " AND e.status IS DISTINCT FROM 'failed'")["n"] == 0


def test_item_of_paused_or_deleted_project_is_cancelled_with_a_reason(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db)
    paused = make_project(db, t["user"], title="paused")
    gone = make_project(db, t["user"], title="gone")
    paused_item = make_queue_item(db, paused)
    gone_item = make_queue_item(db, gone)
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [paused["id"]])
    db.execute("DELETE FROM projects WHERE id = %s", [gone["id"]])

    reports = run_burst(db_url)

    assert sorted(r.outcome for r in reports) == [Outcome.CANCELLED, Outcome.CANCELLED]
    assert item_state(db, paused_item["id"])["last_error"] == "project paused"
    assert item_state(db, gone_item["id"])["last_error"] == "project deleted"
    assert one(db, "SELECT count(*) AS n FROM episodes")["n"] == 0


def test_unknown_owner_timezone_fails_that_item_with_a_clear_error(
    db_url: str, db: Conn
) -> None:
    t = make_tenant(db)
    bad_user = make_user(db, t["org"], timezone="Mars/Olympus")
    bad = make_queue_item(db, make_project(db, bad_user))
    good = make_queue_item(db, t["project"])
    run_burst(db_url)
    state = item_state(db, bad["id"])
    assert state["status"] == "failed"
    assert "timezone" in state["last_error"] and "Mars/Olympus" in state["last_error"]
    assert item_state(db, good["id"])["status"] == "completed"


def test_run_once_processes_one_named_item_even_if_not_due(db_url: str, db: Conn) -> None:
    t = make_tenant(db)
    later = make_queue_item(db, t["project"], scheduled_for=utcnow() + timedelta(days=3))
    assert run_single(db_url) is None  # nothing due
    assert run_single(db_url, later["id"]) is Outcome.SUCCESS
    assert item_state(db, later["id"])["status"] == "completed"


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                          text=True, env=worker_env(url), cwd=ROOT, timeout=120, check=False)


def test_cli_run_once_exit_codes_status_retry_and_cancel(db_url: str, db: Conn) -> None:
    assert cli("run-once", url=db_url).returncode == 3
    t = make_tenant(db, title="permanent")
    item = make_queue_item(db, t["project"])
    failed = cli("run-once", url=db_url)
    assert failed.returncode == 1 and failed.stdout.strip() == "failed"

    status = cli("status", "--json", url=db_url)
    assert status.returncode == 0, status.stderr
    snapshot = json.loads(status.stdout)
    assert snapshot["counts"]["failed"] == 1
    assert snapshot["failed"][0]["id"] == item["id"]
    assert "content refused" in snapshot["failed"][0]["last_error"]
    human = cli("status", url=db_url)
    assert item["id"] in human.stdout and "failed" in human.stdout

    db.execute("UPDATE projects SET title = 'fine now'")
    assert cli("retry", item["id"], url=db_url).returncode == 0
    state = item_state(db, item["id"])
    assert (state["status"], state["attempt_count"]) == ("pending", 0)
    ok = cli("run-once", "--id", item["id"], url=db_url)
    assert ok.returncode == 0 and ok.stdout.strip() == "success", ok.stderr

    nxt = one(db, "SELECT id FROM episode_schedule_queue WHERE status = 'pending'")
    assert cli("cancel", nxt["id"], url=db_url).returncode == 0
    assert item_state(db, nxt["id"])["status"] == "cancelled"
    again = cli("cancel", nxt["id"], url=db_url)
    assert again.returncode == 1 and "is cancelled and cannot be cancelled" in again.stderr
    assert "no queue item" in cli("retry", "queue_nope", url=db_url).stderr


def test_cancel_fails_a_started_episode_and_retry_reopens_it(db_url: str, db: Conn) -> None:
    """`cancel` after an attempt started the episode fails it with the reason (it does not
    stay 'generating'); `retry` makes it generating again, and the next attempt completes it
    with its history intact."""
    t = make_tenant(db, title="flaky:1")
    item = make_queue_item(db, t["project"])
    assert cli("run-once", url=db_url).returncode == 1  # attempt 1 fails, a retry is planned
    episode_id = item_state(db, item["id"])["episode_id"]
    assert one(db, "SELECT status FROM episodes WHERE id = %s", episode_id)["status"] == (
        "generating")

    assert cli("cancel", item["id"], "--reason", "wrong brief", url=db_url).returncode == 0
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", episode_id)
    assert episode["status"] == "failed"
    assert episode["generation_errors"][-1] == "cancelled: wrong brief"

    db.execute("UPDATE projects SET title = 'fine now'")  # retry restarts the attempt count
    assert cli("retry", item["id"], url=db_url).returncode == 0
    assert one(db, "SELECT status FROM episodes WHERE id = %s", episode_id)["status"] == (
        "generating")
    ok = cli("run-once", "--id", item["id"], url=db_url)
    assert ok.returncode == 0, ok.stderr
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", episode_id)
    assert episode["status"] == "ready" and episode["generation_attempts"] == 2
    assert len(episode["generation_errors"]) == 2  # attempt 1's error, then the cancel
    assert item_state(db, item["id"])["episode_id"] == episode_id


def test_cli_commands_without_database_need_no_url() -> None:
    env = {k: v for k, v in worker_env("x").items() if k not in ("MF_DATABASE_URL",)}
    for args in (["--help"], ["--version"], ["generators"], ["run", "--help"]):
        result = subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                                text=True, env=env, cwd=ROOT, timeout=60, check=False)
        assert result.returncode == 0, (args, result.stderr)
    listed = subprocess.run([sys.executable, "-m", "mf_worker", "generators"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert "template" in listed.stdout


def test_backoff_doubles_from_one_second_with_jitter_and_a_five_minute_cap() -> None:
    """The documented rule, in literal seconds (not the module's constants): 1, 2, 4 … ± 20 %,
    really spread (a delay without jitter fails), never above 300 s; a provider's longer
    Retry-After wins up to an hour, a shorter one changes nothing."""
    import random

    rng = random.Random(7)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 256.0)]:
        delays = [ITEM_RETRY.delay(attempt, rng=rng) for _ in range(200)]
        assert 0.8 * base <= min(delays) and max(delays) <= 1.2 * base, attempt
        assert min(delays) < 0.85 * base and max(delays) > 1.15 * base, attempt  # jitter
    capped = [ITEM_RETRY.delay(n, rng=rng) for n in range(10, 60) for _ in range(20)]
    assert max(capped) == 300.0 and min(capped) >= 240.0  # capped after the jitter
    assert len(set(capped)) > 100  # still jittered below the cap
    assert ITEM_RETRY.delay(1, retry_after=42.0, rng=rng) == 42.0  # the provider's wish wins
    assert ITEM_RETRY.delay(1, retry_after=10**9, rng=rng) == 3600.0  # but not forever
    assert ITEM_RETRY.delay(5, retry_after=0.5, rng=rng) >= 0.8 * 16  # a shorter one is ignored


def test_pruner_deletes_old_finished_items_in_batches_and_keeps_episodes(
    db_url: str, db: Conn
) -> None:
    import asyncio

    from mf_worker.db import open_pool
    from mf_worker.maintenance.pruner import Pruner, PrunerConfig

    from .conftest import settings_for

    t = make_tenant(db)
    for _ in range(3):
        make_queue_item(db, make_project(db, t["user"]))
    run_burst(db_url)
    cancelled = make_queue_item(db, make_project(db, t["user"]), status="cancelled")
    fresh = make_queue_item(db, make_project(db, t["user"]), status="cancelled")
    # Forty days pass for all but one: the pruner reads when an item finished (finished_at,
    # stamped once by trigger when it reached its final status).
    db.execute("UPDATE episode_schedule_queue SET finished_at = now() - interval '40 days'"
               " WHERE status IN ('completed', 'cancelled') AND id <> %s", [fresh["id"]])

    async def prune() -> int:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            # Batches of two: several batches in one pass.
            pruner = Pruner(pool, PrunerConfig(retention_days=30, batch_size=2))
            return await pruner.run_once()
        finally:
            await pool.close()

    assert asyncio.run(prune()) == 4  # three completed, one old cancelled
    left = {r["id"]: r["status"] for r in db.execute(
        "SELECT id, status FROM episode_schedule_queue").fetchall()}
    assert cancelled["id"] not in left and left[fresh["id"]] == "cancelled"
    assert "pending" in left.values()  # the open item is never pruned
    assert one(db, "SELECT count(*) AS n FROM episodes WHERE status = 'ready'")["n"] == 3


def test_listener_reconnects_after_its_connection_is_killed_and_still_wakes(
    db_url: str, db: Conn
) -> None:
    import asyncio

    from mf_worker.maintenance.listener import Listener, ListenerConfig

    from .conftest import settings_for

    async def scenario() -> int:
        wake = asyncio.Event()
        listener = Listener(settings_for(db_url), wake, ListenerConfig(ping_interval=0.2))
        task = asyncio.create_task(listener.run())
        await asyncio.wait_for(listener.connected.wait(), 10)
        killed = db.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
            " AND pid <> pg_backend_pid()").fetchone()
        assert killed is not None and killed["n"] == 1
        deadline = asyncio.get_running_loop().time() + 20
        while listener.reconnects < 2:
            assert asyncio.get_running_loop().time() < deadline, "listener did not reconnect"
            await asyncio.sleep(0.05)
        await asyncio.wait_for(listener.connected.wait(), 10)
        wake.clear()
        make_queue_item(db, make_tenant(db)["project"])
        await asyncio.wait_for(wake.wait(), 5)  # woken by NOTIFY on the new connection
        listener.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return listener.reconnects

    assert asyncio.run(scenario()) >= 2


# -- group commit: one bad item in a batch ---------------------------------------------------


@pytest.mark.parametrize(
    ("step", "poison"),
    [
        # The episode row is created by the prepare transaction ...
        ("prepare", "CHECK (project_id <> '{project}')"),
        # ... and set ready by the final write.
        ("final write", "CHECK (status <> 'ready' OR project_id <> '{project}')"),
    ],
)
def test_an_item_the_database_refuses_fails_alone_and_its_batch_mates_complete(
    db_url: str, db: Conn, captured_logs: io.StringIO, step: str, poison: str
) -> None:
    """Items of several organisations go through one transaction; when the database refuses
    one item's rows, the batch is retried item by item, the others complete, and the refused
    item is left to the reaper with nothing written for it."""
    # One claim of four means one wave of prepares; for the final write, generations that
    # end together make the writes arrive as one wave too, as they do under load.
    title = "together:4" if step == "final write" else "prompt"
    tenants = [make_tenant(db, title=title) for _ in range(4)]
    items = [make_queue_item(db, t["project"], scheduled_for=utcnow() - timedelta(minutes=1))
             for t in tenants]
    bad = tenants[2]["project"]["id"]
    db.execute(f"ALTER TABLE episodes ADD CONSTRAINT test_poison {poison.format(project=bad)}")

    reports = run_burst(db_url, concurrency=8, lease_seconds=30)

    outcome = {r.item.id: r.outcome for r in reports}
    assert outcome == {i["id"]: Outcome.LEASE_LOST if i is items[2] else Outcome.SUCCESS
                       for i in items}
    logged = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    splits = [e for e in logged if e["event"] == "batch_split"]
    assert splits and splits[0]["batch"] == step and splits[0]["size"] >= 2, splits
    assert "test_poison" in splits[0]["error"]
    assert any(e["event"] == "item_crashed" and "test_poison" in e["error"] for e in logged)
    for item in items:
        state = item_state(db, item["id"])
        if item is items[2]:  # still held: the reaper returns it when the lease expires
            assert state["status"] == "processing"
            written = db.execute("SELECT count(*) AS n FROM episodes WHERE project_id = %s"
                                 " AND status = 'ready'", [bad]).fetchone()
            assert written == {"n": 0}
        else:
            assert state["status"] == "completed"
