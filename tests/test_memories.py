"""`mf-worker memories migrate`: the seed's "migration script ready but not executed", run for
real — projects.memories entries copied into agent_memory acting for each organisation,
idempotently and resumably, bad entries reported by project and index; and `mf-worker status`
naming the projects that meet the seed's triggers."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .factories import make_org, make_project, make_tenant, make_user
from .workers import ROOT, worker_env

Conn = psycopg.Connection[dict[str, Any]]


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mf_worker", *args], capture_output=True,
                          text=True, env=worker_env(db_url), cwd=ROOT, timeout=120, check=False)


def memories_of(db: Conn, project_id: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT content, memory_type, importance, expires_at, organization_id, source"
        " FROM agent_memory WHERE project_id = %s ORDER BY content", [project_id],
    ).fetchall()


def progress(db: Conn, project_id: str) -> dict[str, Any] | None:
    """What memory_migrations (which status reads) records for the project."""
    return db.execute(
        "SELECT copied, completed_at IS NOT NULL AS complete FROM memory_migrations"
        " WHERE project_id = %s", [project_id]).fetchone()


GOOD_AND_BAD = [
    "Prefers charts over tables",                                          # 0: a string
    {"content": "Works in Lisbon", "type": "context", "importance": 0.9},  # 1
    {"text": "Skip crypto", "memory_type": "avoid",
     "expires_at": "2031-01-01T00:00:00Z"},                                # 2: text, expiry
    42,                                                                    # 3: bad
    {"content": "   "},                                                    # 4: bad: blank
    {"content": "Too keen", "importance": 7},                              # 5: bad
    {"content": "No zone", "expires_at": "2031-01-01T00:00:00"},           # 6: bad
    {"note": "no content key"},                                            # 7: bad
]


def test_migrate_copies_valid_entries_reports_bad_ones_and_is_idempotent(
    db_url: str, db: Conn
) -> None:
    """Strings and objects (content or text; type or memory_type; importance; expires_at) land
    in agent_memory for the project's organisation; every other entry is reported with its
    project and index and skipped; a second run changes nothing."""
    tenant = make_tenant(db, memories=Jsonb(GOOD_AND_BAD))
    pid, org = tenant["project"]["id"], tenant["org"]["id"]

    first = cli(db_url, "memories", "migrate", "--min-count", "1")
    assert first.returncode == 0, first.stderr
    for index, reason in ((3, "neither a string nor an object"), (4, "content"),
                          (5, "importance"), (6, "expires_at"), (7, "content")):
        line = next((x for x in first.stdout.splitlines()
                     if f"{pid} memories[{index}]" in x), None)
        assert line is not None and reason in line, (index, first.stdout)
    assert "3 copied" in first.stdout and "5 skipped" in first.stdout

    rows = memories_of(db, pid)
    assert [(r["content"], r["memory_type"], r["importance"]) for r in rows] == [
        ("Prefers charts over tables", "preference", 0.5),
        ("Skip crypto", "avoid", 0.5),
        ("Works in Lisbon", "context", 0.9),
    ]
    assert rows[1]["expires_at"] == datetime(2031, 1, 1, tzinfo=UTC)
    assert {r["organization_id"] for r in rows} == {org}

    again = cli(db_url, "memories", "migrate", "--min-count", "1")
    assert again.returncode == 0, again.stderr
    assert "0 copied" in again.stdout and "3 already there" in again.stdout
    assert memories_of(db, pid) == rows


def test_an_interrupted_run_resumes_and_dry_run_writes_nothing(db_url: str, db: Conn) -> None:
    """Entries already copied (as by an interrupted run) are not copied again; --dry-run says
    what it would copy and writes nothing; --project limits the run to one project."""
    entries = [f"memory {i}" for i in range(7)]
    tenant = make_tenant(db, memories=Jsonb(entries))
    pid = tenant["project"]["id"]
    other = make_project(db, tenant["user"], memories=Jsonb(["elsewhere"]))
    # A run that stopped after its first batch of 3.
    first = cli(db_url, "memories", "migrate", "--project", pid, "--min-count", "1",
                "--batch-size", "3", "--max-batches", "1")
    assert first.returncode == 0, first.stderr
    assert len(memories_of(db, pid)) == 3
    assert progress(db, pid) == {"copied": 3, "complete": False}

    dry = cli(db_url, "memories", "migrate", "--min-count", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would copy" in dry.stdout and f"{pid}: 7 entries, 4 to copy" in dry.stdout
    assert len(memories_of(db, pid)) == 3 and memories_of(db, other["id"]) == []

    rest = cli(db_url, "memories", "migrate", "--project", pid, "--min-count", "1",
               "--batch-size", "3")
    assert rest.returncode == 0, rest.stderr
    assert sorted(r["content"] for r in memories_of(db, pid)) == entries
    assert memories_of(db, other["id"]) == []
    assert progress(db, pid) == {"copied": 7, "complete": True}


def test_min_count_and_unknown_project(db_url: str, db: Conn) -> None:
    """Only projects with at least --min-count entries (default 50, the seed's trigger) are
    migrated; an unknown --project is an error naming it."""
    org = make_org(db)
    user = make_user(db, org)
    small = make_project(db, user, memories=Jsonb(["a", "b"]))
    big = make_project(db, user, memories=Jsonb([f"m{i}" for i in range(50)]))
    result = cli(db_url, "memories", "migrate")
    assert result.returncode == 0, result.stderr
    assert len(memories_of(db, big["id"])) == 50 and memories_of(db, small["id"]) == []
    missing = cli(db_url, "memories", "migrate", "--project", "prj_nope")
    assert missing.returncode == 1 and "prj_nope" in missing.stderr
    bad = cli(db_url, "memories", "migrate", "--min-count", "0")
    assert bad.returncode == 2 and "--min-count" in bad.stderr


@pytest.mark.parametrize("as_json", [True, False])
def test_status_names_projects_that_meet_the_memory_triggers(
    db_url: str, db: Conn, as_json: bool
) -> None:
    """50+ entries in projects.memories not yet in agent_memory: status lists the project; the
    launch (first organisation) more than three months ago is reported too."""
    org = make_org(db, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    user = make_user(db, org)
    big = make_project(db, user, memories=Jsonb([f"m{i}" for i in range(55)]))
    make_project(db, user, memories=Jsonb(["small"]))
    args = ["status", "--json"] if as_json else ["status"]
    result = cli(db_url, *args)
    assert result.returncode == 0, result.stderr
    if as_json:
        memory = json.loads(result.stdout)["memory_migration"]
        assert memory["projects"] == [{"project_id": big["id"],
                                       "organization_id": org["id"], "memories": 55}]
        assert memory["launched_on"] == "2026-01-01"
        assert memory["three_months_since_launch"] is True
    else:
        assert "memories migrate" in result.stdout and big["id"] in result.stdout
    assert cli(db_url, "memories", "migrate").returncode == 0
    after = json.loads(cli(db_url, "status", "--json").stdout)["memory_migration"]
    assert after["projects"] == []
