"""`mf-worker demo`, the README's first command, run as a real process: on an embedded
PostgreSQL it starts itself (no database configured), and on the database MF_DATABASE_URL names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .factories import make_queue_item, make_tenant
from .workers import ROOT, worker_env

# The demo runs an embedded PostgreSQL and a worker: it stays off the lease tests' cores.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

Conn = psycopg.Connection[dict[str, Any]]
PROJECTS = 4  # one per time zone in mf_worker.cli.demo


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mf_worker", "demo"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=240, check=False)


def _assert_episodes_listed(stdout: str) -> None:
    episodes = re.findall(r"^  \[(\w+)\] \S+ +#1 .+\((\d+) blocks, (\d+) tokens", stdout,
                          re.MULTILINE)
    assert len(episodes) == PROJECTS, stdout
    # Generated ahead of 09:00 local (the lead window), published at it: scheduled until then.
    assert all(status == "scheduled" and int(blocks) > 0 and int(tokens) > 0
               for status, blocks, tokens in episodes), stdout
    assert stdout.count("visible at ") == PROJECTS, stdout
    # Each project's first item completed and its next occurrence is pending.
    assert stdout.count("  completed ") == PROJECTS and stdout.count("  pending ") == PROJECTS
    assert f"{PROJECTS} episodes" in stdout  # the daily aggregate


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: the embedded server puts its Unix socket
    there, and a socket path must stay under ~100 bytes (pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="mfd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_demo_on_an_embedded_postgresql_needs_no_database_and_removes_it(
    short_tmp: Path,
) -> None:
    env = {k: v for k, v in worker_env("unused").items()
           if k not in ("MF_DATABASE_URL", "MF_GENERATOR")}
    env["TMPDIR"] = str(short_tmp)  # where the demo makes its data directory
    env.pop("XDG_RUNTIME_DIR", None)  # as in a container: no warning must reach the operator
    done = _demo(env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    started = re.search(r"starting an embedded PostgreSQL in (\S+)", done.stdout)
    assert started is not None, done.stdout
    assert Path(started.group(1)).parent == short_tmp
    assert "using the database in MF_DATABASE_URL" not in done.stdout
    _assert_episodes_listed(done.stdout)
    assert done.stdout.rstrip().endswith("embedded PostgreSQL stopped and removed")
    assert not os.path.exists(started.group(1))  # cleaned up after itself


def test_demo_says_what_to_do_when_the_temporary_directory_is_too_deep(short_tmp: Path) -> None:
    deep = short_tmp / ("d" * 90)
    deep.mkdir()
    env = {k: v for k, v in worker_env("unused").items()
           if k not in ("MF_DATABASE_URL", "MF_GENERATOR")}
    env["TMPDIR"] = str(deep)
    done = _demo(env)

    assert done.returncode != 0
    assert "point TMPDIR at a short directory, or set MF_DATABASE_URL" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(deep.glob("mf-worker-demo-*")) == []  # its data directory was removed


def test_demo_uses_the_database_in_mf_database_url_and_says_so(db_url: str, db: Conn) -> None:
    done = _demo({k: v for k, v in worker_env(db_url).items() if k != "MF_GENERATOR"})

    assert done.returncode == 0, done.stdout + done.stderr
    assert "using the database in MF_DATABASE_URL" in done.stdout
    assert "embedded PostgreSQL" not in done.stdout
    _assert_episodes_listed(done.stdout)
    counts = db.execute(
        "SELECT (SELECT count(*) FROM episodes WHERE status = 'scheduled') AS scheduled,"
        " (SELECT count(*) FROM token_usage) AS usages,"
        " (SELECT count(*) FROM episode_schedule_queue WHERE status = 'pending') AS next"
    ).fetchone()
    assert counts == {"scheduled": PROJECTS, "usages": PROJECTS, "next": PROJECTS}


def test_demo_refuses_a_database_with_other_open_items(db_url: str, db: Conn) -> None:
    make_queue_item(db, make_tenant(db)["project"])
    done = _demo({k: v for k, v in worker_env(db_url).items() if k != "MF_GENERATOR"})

    assert done.returncode != 0
    assert "already has 1 open queue items" in done.stderr + done.stdout
    assert db.execute("SELECT count(*) AS n FROM episodes").fetchone() == {"n": 0}
