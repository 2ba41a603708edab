"""The scheduler keeps exactly one correct open queue item per active project, on real PostgreSQL.

Each test runs scheduler passes against its own freshly migrated database: in-process through
``Scheduler.run_once`` (with a fixed ``now`` so expected due times can be computed with
``next_occurrence``), or through the real ``mf-worker schedule`` / ``enqueue`` commands in
subprocesses. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta, timezone
from time import monotonic, sleep
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb

from mf_worker.db import open_pool
from mf_worker.engine.events import EventHub, ProjectInvalid
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.scheduling.cadence import next_occurrence
from mf_worker.scheduling.scheduler import SchedulerResult

from .conftest import settings_for
from .factories import make_org, make_project, make_queue_item, make_tenant, make_user

Conn = psycopg.Connection[dict[str, Any]]

NOW = datetime(2026, 3, 4, 12, 30, tzinfo=UTC)  # a Wednesday
OPEN = ("pending", "processing", "blocked")


def soon(days: int = 30) -> datetime:
    """09:00 UTC some days from the real clock: `enqueue --at` takes nothing more than a year
    ahead, so fixed dates would expire."""
    return (datetime.now(UTC) + timedelta(days=days)).replace(hour=9, minute=0, second=0,
                                                               microsecond=0)


# --------------------------------------------------------------------------- helpers


def run_pass(db_url: str, now: datetime | None = NOW,
             on_invalid: Callable[[str, str], None] | None = None,
             **config: Any) -> SchedulerResult:
    """One scheduler pass in this process, on a pool of its own; ``on_invalid`` hears of every
    invalid project the pass finds (through the event hub)."""
    events = EventHub()
    if on_invalid is not None:
        events.subscribe(ProjectInvalid, lambda e: on_invalid(e.project_id, e.error))

    async def main() -> SchedulerResult:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            scheduler = Scheduler(pool, SchedulerConfig(interval=1.0, **config), events=events)
            return await scheduler.run_once(now=now)
        finally:
            await pool.close()

    return asyncio.run(main())


def cli_env(db_url: str, **extra: str) -> dict[str, str]:
    """The environment for an ``mf-worker`` subprocess: no stray MF_* settings, our database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.update({"MF_DATABASE_URL": db_url, "MF_LOG_FORMAT": "json", **extra})
    return env


def cli(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mf_worker", *args],
        env=cli_env(db_url, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def items(db: Conn, project_id: str | None = None) -> list[dict[str, Any]]:
    if project_id is None:
        return db.execute("SELECT * FROM episode_schedule_queue ORDER BY created_at, id").fetchall()
    return db.execute(
        "SELECT * FROM episode_schedule_queue WHERE project_id = %s ORDER BY created_at, id",
        [project_id],
    ).fetchall()


def open_item(db: Conn, project_id: str) -> dict[str, Any]:
    rows = [r for r in items(db, project_id) if r["status"] in OPEN]
    assert len(rows) == 1, rows
    return rows[0]


def next_scheduled_at(db: Conn, project_id: str) -> datetime | None:
    row = db.execute(
        "SELECT next_scheduled_at FROM projects WHERE id = %s", [project_id]
    ).fetchone()
    assert row is not None
    value: datetime | None = row["next_scheduled_at"]
    return value


def assert_planned(db: Conn, project: dict[str, Any], timezone: str, now: datetime = NOW) -> None:
    """The project has one pending item exactly where its cadence says, with full metadata."""
    row = db.execute(
        "SELECT cadence_config, delivery_time FROM projects WHERE id = %s", [project["id"]]
    ).fetchone()
    assert row is not None
    expected = next_occurrence(row["cadence_config"], row["delivery_time"], timezone, now)
    item = open_item(db, project["id"])
    assert item["status"] == "pending"
    assert item["scheduled_for"] == expected
    assert item["run_after"] == expected
    assert item["organization_id"] == project["organization_id"]
    assert item["metadata"] == {
        "user_timezone": timezone,
        "user_local_time": expected.astimezone(ZoneInfo(timezone)).isoformat(),
        "cadence": row["cadence_config"],
        "delivery_time": row["delivery_time"].isoformat(),
    }
    local = datetime.fromisoformat(item["metadata"]["user_local_time"])
    assert local == expected
    assert local.utcoffset() == expected.astimezone(ZoneInfo(timezone)).utcoffset()
    assert next_scheduled_at(db, project["id"]) == expected


# --------------------------------------------------------------------------- 1. planning


def test_pass_creates_one_item_per_active_project_at_next_occurrence_and_is_idempotent(
    db_url: str, db: Conn
) -> None:
    """One pending item per active project at next_occurrence in the owner's zone, with its
    metadata and the projects.next_scheduled_at cache; a second pass changes nothing."""
    org = make_org(db)
    cases: list[tuple[str, dict[str, Any], time]] = [
        ("Europe/London", {"mode": "daily", "days": []}, time(9, 0)),
        ("America/New_York", {"mode": "weekdays"}, time(7, 15)),
        ("Asia/Kolkata", {"mode": "weekly", "days": [5, 1]}, time(18, 45)),
        ("Pacific/Auckland", {"mode": "custom", "days": [0, 6]}, time(6, 0)),
        ("UTC", {"mode": "daily", "days": [], "future_key": "ignored"}, time(12, 30)),
    ]
    projects = []
    for tz, cadence, at in cases:
        user = make_user(db, org, timezone=tz)
        projects.append((make_project(db, user, cadence=cadence, delivery_time=at), tz))

    result = run_pass(db_url)
    assert (result.created, result.rescheduled, result.cancelled, result.invalid) == (
        len(cases),
        0,
        0,
        {},
    )
    for project, tz in projects:
        assert_planned(db, project, tz)
    assert len(items(db)) == len(cases)
    # The "daily at 12:30 UTC" project: strictly after now, so tomorrow, not this instant.
    assert open_item(db, projects[4][0]["id"])["scheduled_for"] == NOW + timedelta(days=1)

    before = items(db)
    again = run_pass(db_url)
    assert (again.created, again.rescheduled, again.cancelled, again.invalid) == (0, 0, 0, {})
    assert items(db) == before
    # Still nothing to do later on, while the items wait (they are open, not yet due or claimed).
    assert run_pass(db_url, now=NOW + timedelta(hours=5)).created == 0


# --------------------------------------------------------------------------- 2-3. cancelling


def test_paused_and_archived_projects_get_no_item(db_url: str, db: Conn) -> None:
    """Only active projects are planned."""
    org = make_org(db)
    user = make_user(db, org)
    active = make_project(db, user)
    paused = make_project(db, user, status="paused")
    archived = make_project(db, user, status="archived")

    assert run_pass(db_url).created == 1
    assert_planned(db, active, "Europe/London")
    assert items(db, paused["id"]) == []
    assert items(db, archived["id"]) == []
    assert next_scheduled_at(db, paused["id"]) is None


@pytest.mark.parametrize("status", ["paused", "archived"])
def test_pausing_or_archiving_cancels_the_pending_item_and_clears_the_cache(
    db_url: str, db: Conn, status: str
) -> None:
    """A pending item of a project that stopped being active is cancelled with the reason."""
    project = make_tenant(db)["project"]
    run_pass(db_url)
    item = open_item(db, project["id"])
    db.execute("UPDATE projects SET status = %s WHERE id = %s", [status, project["id"]])

    result = run_pass(db_url)
    assert (result.created, result.cancelled) == (0, 1)
    [row] = items(db, project["id"])
    assert row["id"] == item["id"]
    assert row["status"] == "cancelled"
    assert row["last_error"] == f"project {status}"
    assert next_scheduled_at(db, project["id"]) is None
    assert run_pass(db_url).cancelled == 0


def test_blocked_item_of_paused_project_is_cancelled(db_url: str, db: Conn) -> None:
    """Blocked items wait like pending ones, so pausing cancels them too."""
    project = make_tenant(db, status="paused")["project"]
    item = make_queue_item(db, project, status="blocked")
    assert run_pass(db_url).cancelled == 1
    [row] = items(db, project["id"])
    assert (row["id"], row["status"], row["last_error"]) == (
        item["id"],
        "cancelled",
        "project paused",
    )


def test_processing_item_of_paused_project_is_left_alone(db_url: str, db: Conn) -> None:
    """An item a worker holds finishes; the scheduler neither cancels nor duplicates it."""
    project = make_tenant(db)["project"]
    run_pass(db_url)
    item = open_item(db, project["id"])
    db.execute(
        "UPDATE episode_schedule_queue SET status = 'processing', locked_by = 'worker-1',"
        " lease_expires_at = now() + interval '5 minutes', picked_up_at = now() WHERE id = %s",
        [item["id"]],
    )
    db.execute("UPDATE projects SET status = 'paused' WHERE id = %s", [project["id"]])

    result = run_pass(db_url)
    assert (result.created, result.rescheduled, result.cancelled) == (0, 0, 0)
    [row] = items(db, project["id"])
    assert (row["status"], row["locked_by"], row["last_error"]) == ("processing", "worker-1", None)


def test_deleted_projects_pending_item_is_cancelled(db_url: str, db: Conn) -> None:
    """Deleting a project nulls the item's project_id (FK); the pass cancels it with a reason."""
    tenant = make_tenant(db)
    keep = make_project(db, tenant["user"])
    run_pass(db_url)
    item = open_item(db, tenant["project"]["id"])
    db.execute("DELETE FROM projects WHERE id = %s", [tenant["project"]["id"]])

    result = run_pass(db_url)
    assert (result.created, result.cancelled) == (0, 1)
    row = db.execute("SELECT * FROM episode_schedule_queue WHERE id = %s", [item["id"]]).fetchone()
    assert row is not None
    assert (row["project_id"], row["status"], row["last_error"]) == (
        None,
        "cancelled",
        "project deleted",
    )
    assert open_item(db, keep["id"])["status"] == "pending"
    assert run_pass(db_url).cancelled == 0


# --------------------------------------------------------------------------- 4. rescheduling


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("projects", "cadence_config", Jsonb({"mode": "custom", "days": [0]})),
        ("projects", "delivery_time", time(21, 5)),
        ("users", "timezone", "Australia/Sydney"),
    ],
    ids=["cadence", "delivery_time", "timezone"],
)
def test_changing_cadence_time_or_zone_reschedules_the_pending_item(
    db_url: str, db: Conn, table: str, column: str, value: Any
) -> None:
    """The same pending item moves to the new next occurrence with fresh metadata and cache."""
    tenant = make_tenant(db, cadence={"mode": "weekdays"})
    project, user = tenant["project"], tenant["user"]
    run_pass(db_url)
    before = open_item(db, project["id"])
    row_id = project["id"] if table == "projects" else user["id"]
    db.execute(f"UPDATE {table} SET {column} = %s WHERE id = %s", [value, row_id])
    tz = value if column == "timezone" else user["timezone"]

    result = run_pass(db_url)
    assert (result.created, result.rescheduled, result.cancelled) == (0, 1, 0)
    after = open_item(db, project["id"])
    assert after["id"] == before["id"]
    assert after["scheduled_for"] != before["scheduled_for"]
    assert_planned(db, project, tz)
    assert run_pass(db_url).rescheduled == 0


def test_attempted_or_manual_items_are_not_rescheduled(db_url: str, db: Conn) -> None:
    """Only never-attempted items the scheduler planned itself follow a cadence change."""
    tenant = make_tenant(db)
    plain, user = tenant["project"], tenant["user"]
    attempted = make_project(db, user)
    manual = make_project(db, user)
    run_pass(db_url)
    before = {p["id"]: open_item(db, p["id"]) for p in (attempted, manual, plain)}
    db.execute(
        "UPDATE episode_schedule_queue SET attempt_count = 1, last_error = 'timeout'"
        " WHERE project_id = %s",
        [attempted["id"]],
    )
    db.execute(
        "UPDATE episode_schedule_queue SET metadata = metadata || '{\"manual\": true}'"
        " WHERE project_id = %s",
        [manual["id"]],
    )
    db.execute("UPDATE projects SET delivery_time = '17:00'")

    result = run_pass(db_url)
    assert (result.created, result.rescheduled) == (0, 1)
    for project in (attempted, manual):
        after = open_item(db, project["id"])
        assert after["scheduled_for"] == before[project["id"]]["scheduled_for"]
        assert after["metadata"]["delivery_time"] == "09:00:00"
        assert next_scheduled_at(db, project["id"]) == before[project["id"]]["scheduled_for"]
    assert_planned(db, plain, "Europe/London")


def test_item_enqueued_by_hand_is_not_rescheduled(db_url: str, db: Conn) -> None:
    """An item from `mf-worker enqueue` keeps its time whatever the project's cadence."""
    project = make_tenant(db)["project"]
    at = soon()
    done = cli(db_url, "enqueue", project["id"], "--at", at.isoformat())
    assert done.returncode == 0, done.stderr
    db.execute('UPDATE projects SET cadence_config = \'{"mode": "weekly"}\'')
    result = run_pass(db_url)
    assert (result.created, result.rescheduled) == (0, 0)
    assert open_item(db, project["id"])["scheduled_for"] == at


def test_delivery_time_with_fractional_seconds_is_stable(db_url: str, db: Conn) -> None:
    """A delivery time with microseconds is planned once, not "rescheduled" on every pass."""
    project = make_tenant(db, delivery_time=time(9, 0, 0, 500000))["project"]
    assert run_pass(db_url).created == 1
    assert_planned(db, project, "Europe/London")
    assert run_pass(db_url).rescheduled == 0


# --------------------------------------------------------------------------- 5. invalid data


def test_invalid_projects_get_no_item_and_are_reported_by_field(db_url: str, db: Conn) -> None:
    """Bad zone, mode or days: no item, result.invalid names the field; others still planned."""
    org = make_org(db)
    good_user = make_user(db, org, timezone="Asia/Tokyo")
    mars = make_user(db, org, timezone="Mars/Olympus")
    good_before = make_project(db, good_user, id="prj_0_good")
    bad = [  # (the field the error must name, the project)
        ("timezone", make_project(db, mars, id="prj_1_zone")),
        (
            "cadence_config.mode",
            make_project(db, good_user, id="prj_2_mode", cadence={"mode": "hourly"}),
        ),
        (
            "cadence_config.days[1]",
            make_project(
                db, good_user, id="prj_3_day7", cadence={"mode": "custom", "days": [1, 7]}
            ),
        ),
        (
            "cadence_config.days",
            make_project(db, good_user, id="prj_4_empty", cadence={"mode": "custom", "days": []}),
        ),
        (
            "cadence_config.mode",
            make_project(db, good_user, id="prj_5_numeric_mode", cadence={"mode": 5}),
        ),
        (
            "cadence_config.days",
            make_project(
                db, good_user, id="prj_6_days_text", cadence={"mode": "daily", "days": "1"}
            ),
        ),
    ]
    good_after = make_project(db, good_user, id="prj_9_good")
    reported: list[tuple[str, str]] = []

    result = run_pass(db_url, on_invalid=lambda pid, err: reported.append((pid, err)))
    assert result.created == 2
    assert_planned(db, good_before, "Asia/Tokyo")
    assert_planned(db, good_after, "Asia/Tokyo")
    assert set(result.invalid) == {p["id"] for _, p in bad}
    for field_name, project in bad:
        assert result.invalid[project["id"]].startswith(field_name + ":")
        assert items(db, project["id"]) == []
        assert next_scheduled_at(db, project["id"]) is None
    assert "Mars/Olympus" in result.invalid["prj_1_zone"]
    assert sorted(reported) == sorted(result.invalid.items())

    # A steady pass does not look at them again (nothing changed); a sweep (hourly by default)
    # still reports them, still no item.
    steady = run_pass(db_url, NOW + timedelta(seconds=1))
    assert (steady.swept, steady.examined, steady.created, steady.invalid) == (False, 0, 0, {})
    again = run_pass(db_url, NOW + timedelta(seconds=2), sweep_interval=1.0)
    assert again.swept
    assert (again.created, set(again.invalid)) == (0, set(result.invalid))

    # Fixing the data gets the project its item.
    db.execute("UPDATE users SET timezone = 'America/Chicago' WHERE id = %s", [mars["id"]])
    fixed = run_pass(db_url)
    assert fixed.created == 1
    assert "prj_1_zone" not in fixed.invalid
    assert_planned(db, bad[0][1], "America/Chicago")


def test_non_object_cadence_cannot_be_stored(db: Conn) -> None:
    """The schema's CHECK keeps a JSON array (or scalar) out of cadence_config altogether."""
    user = make_tenant(db)["user"]
    with pytest.raises(psycopg.errors.CheckViolation):
        make_project(db, user, cadence_config=Jsonb([1, 2]))


# --------------------------------------------------------------------------- 6. pagination


def test_keyset_pagination_plans_every_project_across_small_batches(db_url: str, db: Conn) -> None:
    """batch_size=7 over 50 valid projects (plus a page of invalid ones): 50 items, one pass."""
    user = make_tenant(db)["user"]
    db.execute("DELETE FROM projects")
    for n in range(57):
        invalid = 7 <= n < 14  # exactly the second page: a page with nothing to insert
        make_project(
            db,
            user,
            id=f"prj_page_{n:03d}",
            cadence={"mode": "custom", "days": []} if invalid else {"mode": "weekdays"},
        )

    result = run_pass(db_url, batch_size=7)
    assert (result.created, len(result.invalid)) == (50, 7)
    rows = db.execute(
        "SELECT count(*) AS n, count(DISTINCT project_id) AS projects"
        " FROM episode_schedule_queue WHERE status = 'pending'"
    ).fetchone()
    assert rows == {"n": 50, "projects": 50}

    # Rescheduling pages the same way.
    db.execute("UPDATE projects SET delivery_time = '06:30'")
    moved = run_pass(db_url, batch_size=7)
    assert (moved.created, moved.rescheduled) == (0, 50)
    unmoved = db.execute(
        "SELECT count(*) AS n FROM episode_schedule_queue WHERE metadata->>'delivery_time'"
        " <> '06:30:00'"
    ).fetchone()
    assert unmoved == {"n": 0}


# --------------------------------------------------------------------------- 7. the race


RACE_PROJECTS = 1000
RACE_ZONES = [
    "UTC",
    "Europe/London",
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Australia/Sydney",
    "Pacific/Auckland",
    "America/Sao_Paulo",
]


def seed_race(db: Conn) -> None:
    """10 organisations, one user each in its own zone, 1,000 active projects among them."""
    db.execute(
        "INSERT INTO organizations (id, name)"
        " SELECT 'org_race_' || g, 'Race ' || g FROM generate_series(0, 9) g"
    )
    db.execute(
        "INSERT INTO users (id, organization_id, email, timezone)"
        " SELECT 'usr_race_' || g, 'org_race_' || g, 'race' || g || '@example.com', z.zone"
        " FROM generate_series(0, 9) g"
        " JOIN unnest(%s::text[]) WITH ORDINALITY AS z(zone, n) ON z.n = g + 1",
        [RACE_ZONES],
    )
    db.execute(
        "INSERT INTO projects (id, organization_id, user_id, title, cadence_config,"
        " delivery_time)"
        " SELECT 'prj_race_' || lpad(g::text, 5, '0'), 'org_race_' || g %% 10,"
        "        'usr_race_' || g %% 10, 'Race project ' || g,"
        '        (ARRAY[\'{"mode": "daily"}\', \'{"mode": "weekdays"}\','
        '               \'{"mode": "weekly", "days": [3]}\','
        '               \'{"mode": "custom", "days": [0, 2, 4]}\'])[g %% 4 + 1]::jsonb,'
        "        make_time(g %% 24, (g * 7) %% 60, 0)"
        " FROM generate_series(1, %s) g",
        [RACE_PROJECTS],
    )


def wait_until_blocked(db: Conn, procs: list[subprocess.Popen[str]], timeout: float = 30) -> None:
    """Wait until every process has a session waiting for a lock (our gate) in this database."""
    deadline = monotonic() + timeout
    while True:
        row = db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'mf-worker %%' AND wait_event_type = 'Lock'"
        ).fetchone()
        if row is not None and row["n"] >= len(procs):
            return
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(
                    f"scheduler exited {proc.returncode} before the gate opened:\n{out}\n{err}"
                )
        if monotonic() > deadline:
            pytest.fail("the schedulers never reached the gate")
        sleep(0.02)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_scheduler_processes_racing_create_exactly_one_item_per_project(
    db_url: str, db: Conn
) -> None:
    """Two `mf-worker schedule` processes at once: both succeed, 1,000 projects, 1,000 items.
    (They take turns through the fleet's advisory lock; the unique index on open items stays
    the guard against every other writer.)

    Process start-up jitter is longer than a whole pass, so without help one process would
    simply finish first. A gate makes the race real: the test holds an exclusive lock on
    projects until both processes' first query is waiting for it, then lets both go at once.
    """
    seed_race(db)
    splits = []
    for round_ in range(3):
        with psycopg.connect(db_url) as gate:
            gate.execute("LOCK TABLE projects IN ACCESS EXCLUSIVE MODE")
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "mf_worker", "schedule"],
                    env=cli_env(db_url),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            try:
                wait_until_blocked(db, procs)
            except BaseException:
                for proc in procs:
                    proc.kill()
                    proc.communicate()
                raise
            gate.commit()  # open the gate
        outputs = [p.communicate(timeout=60) for p in procs]
        created = []
        for proc, (out, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, f"round {round_}: {out}\n{err}"
            match = re.fullmatch(r"created (\d+), rescheduled 0, cancelled 0, invalid 0\n", out)
            assert match, out
            created.append(int(match.group(1)))
            assert '"level": "error"' not in err, err
        # Each project was planned by exactly one of the two: no double counting either.
        assert sum(created) == RACE_PROJECTS, outputs
        splits.append(created)

        counts = db.execute(
            "SELECT count(*) AS n, count(DISTINCT project_id) AS projects"
            " FROM episode_schedule_queue WHERE status = 'pending'"
        ).fetchone()
        assert counts == {"n": RACE_PROJECTS, "projects": RACE_PROJECTS}, f"round {round_}"
        stale_cache = db.execute(
            "SELECT count(*) AS n FROM projects p JOIN episode_schedule_queue q"
            " ON q.project_id = p.id AND q.status = 'pending'"
            " WHERE p.next_scheduled_at IS DISTINCT FROM q.scheduled_for"
        ).fetchone()
        assert stale_cache == {"n": 0}

        db.execute(
            "UPDATE episode_schedule_queue SET status = 'cancelled', last_error = 'next round'"
            " WHERE status = 'pending'"
        )
    print("items created per process, per round:", splits)


# --------------------------------------------------------------------------- 8. enqueue CLI


def test_enqueue_cli_adds_refuses_and_replaces_manual_items(db_url: str, db: Conn) -> None:
    """`mf-worker enqueue`: a manual item at --at; a second needs --replace, which cancels the
    waiting one; the refusal names the open item (in UTC, whatever the session zone)."""
    project = make_tenant(db)["project"]
    pid = project["id"]
    at, later = soon(30), soon(60)
    plus_one = later.astimezone(timezone(timedelta(hours=1))).isoformat()

    first = cli(db_url, "enqueue", pid, "--at", at.isoformat().replace("+00:00", "Z"))
    assert first.returncode == 0, first.stderr
    item = open_item(db, pid)
    assert first.stdout.strip() == f"enqueued {item['id']} for {pid}, due {at.isoformat()}"
    # Claimable MF_LEAD_SECONDS (15 minutes by default) before it is due.
    assert (item["status"], item["scheduled_for"], item["run_after"]) == (
        "pending", at, at - timedelta(minutes=15))
    assert item["metadata"]["manual"] is True
    assert item["metadata"]["user_timezone"] == "Europe/London"
    assert item["metadata"]["user_local_time"] == at.astimezone(
        ZoneInfo("Europe/London")).isoformat()
    assert next_scheduled_at(db, pid) == at

    # PGTZ makes the session zone non-UTC; the message must still show the due time in UTC.
    refused = cli(
        db_url, "enqueue", pid, "--at", plus_one, PGTZ="America/New_York"
    )
    assert refused.returncode == 1
    assert item["id"] in refused.stderr
    assert "--replace" in refused.stderr
    assert f"due {at:%Y-%m-%dT%H:%M:%SZ}" in refused.stderr
    assert [r["id"] for r in items(db, pid)] == [item["id"]]

    replaced = cli(db_url, "enqueue", pid, "--at", plus_one, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    old, new = items(db, pid)
    assert (old["id"], old["status"], old["last_error"]) == (
        item["id"],
        "cancelled",
        "replaced by mf-worker enqueue",
    )
    assert new["status"] == "pending"
    assert new["scheduled_for"] == later
    assert new["metadata"]["manual"] is True
    assert next_scheduled_at(db, pid) == new["scheduled_for"]

    # An item a worker holds is never replaced.
    db.execute(
        "UPDATE episode_schedule_queue SET status = 'processing', locked_by = 'worker-1',"
        " lease_expires_at = now() + interval '5 minutes' WHERE id = %s",
        [new["id"]],
    )
    busy = cli(db_url, "enqueue", pid, "--replace")
    assert busy.returncode == 1
    assert "being processed" in busy.stderr and new["id"] in busy.stderr
    assert len(items(db, pid)) == 2


def test_enqueue_cli_now_when_no_at_is_given(db_url: str, db: Conn) -> None:
    """Without --at the item is due immediately."""
    project = make_tenant(db)["project"]
    before = datetime.now(UTC)
    done = cli(db_url, "enqueue", project["id"])
    assert done.returncode == 0, done.stderr
    item = open_item(db, project["id"])
    assert before - timedelta(seconds=1) <= item["scheduled_for"] <= datetime.now(UTC)


def test_enqueue_cli_refuses_paused_and_unknown_projects_and_naive_times(
    db_url: str, db: Conn
) -> None:
    """Clear failures: paused or unknown project exit 1, a time without an offset exits 2."""
    paused = make_tenant(db, status="paused")["project"]

    result = cli(db_url, "enqueue", paused["id"], "--at", soon().isoformat())
    assert result.returncode == 1
    assert f"project {paused['id']} is paused" in result.stderr

    result = cli(db_url, "enqueue", "prj_does_not_exist", "--at", soon().isoformat())
    assert result.returncode == 1
    assert "'prj_does_not_exist' does not exist" in result.stderr

    active = make_project(db, make_user(db, make_org(db)))
    result = cli(db_url, "enqueue", active["id"], "--at", "2030-01-01T09:00")
    assert result.returncode == 2
    assert "offset" in result.stderr

    result = cli(db_url, "enqueue", active["id"], "--at", "next tuesday")
    assert result.returncode == 2
    assert "ISO 8601" in result.stderr
    assert items(db) == []


# --------------------------------------------------------------------------- 9. schedule CLI


def test_schedule_cli_prints_counts_and_lists_invalid_projects(db_url: str, db: Conn) -> None:
    """`mf-worker schedule` runs one pass and reports created/rescheduled/cancelled/invalid."""
    org = make_org(db)
    user = make_user(db, org)
    a = make_project(db, user, id="prj_cli_a")
    make_project(db, user, id="prj_cli_b")
    paused = make_project(db, user, id="prj_cli_c", status="paused")
    make_queue_item(db, paused)
    make_project(db, user, id="prj_cli_d", cadence={"mode": "fortnightly"})
    make_project(db, make_user(db, org, timezone="Mars/Olympus"), id="prj_cli_e")

    done = cli(db_url, "schedule")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "created 2, rescheduled 0, cancelled 1, invalid 2\n"
        "  project prj_cli_d: cadence_config.mode: unknown mode 'fortnightly'"
        " (expected daily, weekdays, weekly or custom)\n"
        "  project prj_cli_e: timezone: unknown IANA time zone 'Mars/Olympus'\n"
    )
    assert "project_schedule_invalid" in done.stderr  # logged as well, as JSON lines

    db.execute("UPDATE projects SET delivery_time = '10:00' WHERE id = %s", [a["id"]])
    done = cli(db_url, "schedule")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "created 0, rescheduled 1, cancelled 0, invalid 2"


def test_schedule_cli_without_database_url_exits_2() -> None:
    """No MF_DATABASE_URL: a configuration error, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_") and k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "mf_worker", "schedule"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MF_DATABASE_URL is not set" in done.stderr


def audit_rows(db: Conn) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT action, resource_id, old_value, new_value, actor, user_id, organization_id"
        " FROM audit_log WHERE action LIKE 'queue_item.%' ORDER BY created_at, action"
    ).fetchall()


def test_operator_actions_are_audited_with_actor_and_statuses(db_url: str, db: Conn) -> None:
    """enqueue, enqueue --replace, cancel and retry each write an audit_log row naming the
    operator (--actor, else the OS user running the command), the action, the item and its old
    and new status; a refused action writes nothing."""
    tenant = make_tenant(db)
    pid, org = tenant["project"]["id"], tenant["org"]["id"]
    os_user = pwd.getpwuid(os.getuid()).pw_name

    assert cli(db_url, "enqueue", pid, "--at", soon().isoformat()).returncode == 0
    first = open_item(db, pid)
    replaced = cli(db_url, "enqueue", pid, "--replace", "--actor", "alice@support")
    assert replaced.returncode == 0, replaced.stderr
    second = open_item(db, pid)
    assert cli(db_url, "cancel", second["id"], "--actor", "bob").returncode == 0
    assert cli(db_url, "retry", second["id"]).returncode == 0
    refused = cli(db_url, "cancel", first["id"], "--actor", "bob")  # already cancelled
    assert refused.returncode == 1

    rows = audit_rows(db)
    assert [(r["action"], r["resource_id"], r["old_value"], r["new_value"], r["actor"])
            for r in rows] == [
        ("queue_item.enqueue", first["id"], None, "pending", os_user),
        ("queue_item.enqueue", second["id"], None, "pending", "alice@support"),
        ("queue_item.replace", first["id"], "pending", "cancelled", "alice@support"),
        ("queue_item.cancel", second["id"], "pending", "cancelled", "bob"),
        ("queue_item.retry", second["id"], "cancelled", "pending", os_user),
    ]
    assert {(r["organization_id"], r["user_id"]) for r in rows} == {(org, None)}


def test_blank_actor_is_refused_before_anything_changes(db_url: str, db: Conn) -> None:
    """--actor '' is a usage error naming the flag; nothing is enqueued or audited."""
    pid = make_tenant(db)["project"]["id"]
    result = cli(db_url, "enqueue", pid, "--actor", " ")
    assert result.returncode == 2
    assert "--actor" in result.stderr
    assert items(db, pid) == [] and audit_rows(db) == []
