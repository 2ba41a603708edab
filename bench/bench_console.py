"""Benchmark of the operator console's pages on a large database (#27).

For each size N (default 10,000 and 1,000,000 projects) it loads the data set of
``bench_scale.py`` (N projects with their open items, ``--history`` × N queue rows and usage
rows: 10 million of each at a million projects, built with ``generate_series``), adds a
failed item with an episode, blocks and usage, then serves the real console application
(uvicorn, in this process, signed in over HTTP with httpx as a browser would) and requests
each page ``--requests`` times in turn, after a warm-up round. It prints p50 and p95 latency
per page in milliseconds, as the client measures it (request sent to body read, over
loopback), beside the 200 ms p95 target.

Pages: the overview, the items list unfiltered and its second page (keyset), by state (failed,
blocked), by organisation, by project, by error text among failed items and among all items
of one day, one item's timeline, one project, the organisations and the providers.

Throwaway databases ``mf_bench_console_<random>`` on ``MF_BENCH_DATABASE_URL`` (default
``postgresql:///postgres``), dropped at the end. The load needs a superuser. About 10 minutes
at a million projects on a 2-core machine, most of it the load.

    .venv/bin/python bench/bench_console.py [--sizes 10000 1000000] [--history 10] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import uvicorn
from bench_scale import _with_database, build, migrate
from psycopg import sql

from mf_worker.console.app import create_app
from mf_worker.console.config import ConsoleSettings
from mf_worker.console.users import add_user
from mf_worker.logs import configure_logging
from mf_worker.settings import load_settings, parse_plugin_settings

TARGET_P95_MS = 200.0
PASSWORD = "bench-password-long"


def story(url: str) -> dict[str, str]:
    """A failed item with an episode, a block and usage, on an organisation of the load."""
    now = datetime.now(UTC)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO episodes (id, project_id, organization_id, sequence_number,"
                     " title, status, generation_attempts, generation_errors)"
                     " VALUES ('ep_bench', 'prj_7', 'org_7', 1, 'Bench', 'failed', 2,"
                     " ARRAY['timeout', 'empty text'])")
        conn.execute("INSERT INTO blocks (episode_id, organization_id, content, position)"
                     " VALUES ('ep_bench', 'org_7', %s, 0)", ["## Title\n\n" + "Text. " * 300])
        conn.execute("INSERT INTO token_usage (organization_id, project_id, episode_id,"
                     " operation, model, prompt_tokens, completion_tokens, cost_gbp,"
                     " billing_date) VALUES ('org_7', 'prj_7', 'ep_bench',"
                     " 'episode_generation', 'gpt-4o', 1000, 200, 0.0012, %s)", [now.date()])
        conn.execute("INSERT INTO episode_schedule_queue (id, project_id, organization_id,"
                     " scheduled_for, run_after, status, attempt_count, last_error, episode_id)"
                     " VALUES ('queue_bench', 'prj_7', 'org_7', %s, %s, 'failed', 2,"
                     " 'empty text', 'ep_bench')", [now - timedelta(hours=1)] * 2)
        conn.execute("ANALYZE")
    return {"item": "queue_bench", "project": "prj_7", "org": "org_7"}


def pages(ids: dict[str, str], http: httpx.Client) -> dict[str, str]:
    day = (datetime.now(UTC) - timedelta(days=3)).date()
    first = http.get("/items").text
    found = re.search(r'<a href="([^"]+)" rel="next">', first)
    second = found.group(1).replace("&amp;", "&") if found else "/items"
    return {
        "overview": "/",
        "items": "/items",
        "items page 2": second,
        "items failed": "/items?status=failed",
        "items blocked": "/items?status=blocked",
        "items by org": f"/items?organization={ids['org']}",
        "items by project": f"/items?project={ids['project']}",
        "items failed + error": "/items?status=failed&error=history",
        "items error in a day": f"/items?error=history&since={day}&until={day + timedelta(1)}",
        "item timeline": f"/items/{ids['item']}",
        "project": f"/projects/{ids['project']}",
        "organisations": "/organizations",
        "providers": "/providers",
    }


def measure(url: str, ids: dict[str, str], requests: int) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as folder:
        users = Path(folder) / "users"
        add_user(users, "bench", "operator", PASSWORD)
        environ = {"MF_CONSOLE_USERS_FILE": str(users), "MF_CONSOLE_SECRET_KEY": "b" * 40}
        settings, _ = load_settings(environ=environ, overrides={"database_url": url})
        app = create_app(settings, parse_plugin_settings(ConsoleSettings, environ))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                               log_level="error", access_log=False))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                token = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text)
                assert token
                http.post("/login", data={"username": "bench", "password": PASSWORD,
                                          "csrf": token.group(1)})
                paths = pages(ids, http)
                samples: dict[str, list[float]] = {name: [] for name in paths}
                for round_ in range(requests + 1):
                    for name, path in paths.items():
                        started = time.perf_counter()
                        answer = http.get(path)
                        elapsed = time.perf_counter() - started
                        if answer.status_code != 200:
                            raise RuntimeError(f"{path}: HTTP {answer.status_code}")
                        if round_:  # the first round warms caches and prepared plans
                            samples[name].append(elapsed * 1000)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    return {name: (statistics.median(v), statistics.quantiles(v, n=20)[18])
            for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")
    results: dict[int, dict[str, tuple[float, float]]] = {}
    for n in args.sizes:
        name = f"mf_bench_console_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = _with_database(admin_url, name)
        try:
            asyncio.run(migrate(url))
            load = build(url, n, args.history)
            print(f"{n:,} projects, {args.history * n:,} queue rows: loaded in {load:.0f} s",
                  flush=True)
            results[n] = measure(url, story(url), args.requests)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                              .format(sql.Identifier(name)))
    header = f"{'page':<22}" + "".join(f"{f'{n:,} p50':>16}{'p95':>9}" for n in results)
    print(header + "   target p95")
    print("-" * (len(header) + 13))
    for page in next(iter(results.values())):
        cells = "".join(f"{results[n][page][0]:>16.1f}{results[n][page][1]:>9.1f}"
                        for n in results)
        worst = max(results[n][page][1] for n in results)
        verdict = "ok" if worst <= TARGET_P95_MS else "MISSED"
        print(f"{page:<22}{cells}   ≤ {TARGET_P95_MS:.0f} ms {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
