"""Helpers to run the engine for real: in this process (asyncio) or as `mf-worker` processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from mf_worker.daemon import build, run_one, serve, shutdown
from mf_worker.db import open_pool
from mf_worker.engine.worker import AttemptReport, Outcome
from mf_worker.generation import Generator, load_generator
from mf_worker.maintenance.scheduler import Scheduler, SchedulerConfig
from mf_worker.settings import Settings, load_settings

from .conftest import settings_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPTED = "tests.generators:scripted"


def llm_settings() -> Settings:
    """Settings holding only this process's ``MF_LLM_*`` variables (and a systemd credentials
    directory): what a generator plugin such as `openai` is configured from, as `mf-worker`
    would configure it from its environment. Everything else keeps its default."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith("MF_LLM_") or k == "CREDENTIALS_DIRECTORY"}
    settings, _ = load_settings(environ=env)
    return settings


def run_burst(db_url: str, generator: str | Generator = SCRIPTED, *,
              fallback: Generator | None = None, **overrides: Any) -> list[AttemptReport]:
    """Run a worker in this process until nothing is due; return every attempt's report.
    ``fallback``: the fallback generator (with ``fallback_generator`` naming it in the
    settings, for the episodes' records)."""
    reports: list[AttemptReport] = []
    gen = load_generator(generator, llm_settings()) if isinstance(generator, str) else generator
    settings = settings_for(db_url, **{"poll_interval": 0.05, **overrides})

    async def main() -> None:
        components = await build(settings, generator=gen, fallback=fallback,
                                 observers=[reports.append], scheduler=False)
        await serve(components, burst=True, install_signals=False)

    asyncio.run(main())
    return reports


def run_single(db_url: str, item_id: str | None = None, generator: str = SCRIPTED,
               **overrides: Any) -> Outcome | None:
    """`run-once` in this process."""
    settings = settings_for(db_url, **overrides)

    async def main() -> Outcome | None:
        components = await build(settings, generator=load_generator(generator, llm_settings()),
                                 scheduler=False)
        try:
            return await run_one(components, item_id)
        finally:
            await shutdown(components)

    return asyncio.run(main())


def worker_env(db_url: str, **env: str) -> dict[str, str]:
    """A clean environment for an `mf-worker` process against the test database."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    base.pop("DATABASE_URL", None)
    base.update({
        "MF_DATABASE_URL": db_url,
        "MF_LOG_FORMAT": "json",
        "MF_GENERATOR": SCRIPTED,
        "MF_POLL_INTERVAL": "0.2",
        "MF_METRICS_ADDR": "127.0.0.1:0",
        "PYTHONPATH": str(ROOT),
        **env,
    })
    return base


def start_worker(db_url: str, *args: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start `mf-worker run ARGS` as a real process, logging to ``log``."""
    with log.open("ab") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "mf_worker", "run", *args],
            stdout=handle, stderr=subprocess.STDOUT, env=worker_env(db_url, **env), cwd=ROOT,
        )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET (error statuses included, their sockets closed)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # it holds the response's socket
            return exc.code, exc.read().decode()


def port_of(log: Path, timeout: float = 30) -> int:
    """The port a daemon started with MF_METRICS_ADDR=…:0 reports in its log."""
    found: list[int] = []

    def listening() -> bool:
        for line in log.read_text().splitlines():
            if '"http_listening"' in line:
                found.append(json.loads(line)["port"])
                return True
        return False

    wait_until(listening, timeout, "the daemon to report its HTTP port")
    return found[0]


def scheduler_pass(db_url: str, now: datetime, lead_seconds: float = 900.0) -> None:
    """One scheduler pass at ``now`` (the loop's run_once, time as an input)."""
    async def main() -> None:
        pool = await open_pool(settings_for(db_url), max_size=2)
        try:
            config = SchedulerConfig(interval=1.0, lead_seconds=lead_seconds)
            await Scheduler(pool, config).run_once(now=now)
        finally:
            await pool.close()

    asyncio.run(main())
