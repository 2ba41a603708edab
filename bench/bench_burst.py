"""A zone's worth of items due at once against a rate-limited provider (issue #13's scenario).

Seeds N items due together — one big organisation's ``--big`` items due ``--lead`` seconds
before the rest, then ``--small-orgs`` organisations with ``--small`` items each — starts a
provider-like server (``tests/provider.py``: requests per minute R, optionally tokens per
minute, latency L, 429 with Retry-After and x-ratelimit-* headers beyond its buckets) and
``--processes`` real ``mf-worker run`` processes with the ``openai`` generator pointed at it,
waits until no item is pending or processing (or ``--timeout``), and prints:

* items completed and failed (and still open at the timeout);
* the provider's 429s per accepted call, and its 503s;
* the drain time (first due item to last completion) against N ÷ R;
* when each organisation's first episode was written, in seconds and as a share of the drain.

The issue's targets for the default scenario: 0 failed; 429s at most 10 % of accepted calls;
drain within 1.3 × N ÷ R; every small organisation's first episode within the first 20 % of the
drain. Figures only: nothing here asserts.

``--limits`` also sets ``MF_LLM_REQUESTS_PER_MINUTE`` (and ``MF_LLM_TOKENS_PER_MINUTE`` with
``--tpm``) on the workers, so the fleet paces itself; without it they must learn from 429s. The
script creates a throwaway database on the server named by ``MF_BENCH_DATABASE_URL`` (default
``postgresql:///postgres``) and drops it at the end.

    .venv/bin/python bench/bench_burst.py [--processes 2] [--concurrency 16] [--rpm 120]
        [--latency 1.0] [--big 120] [--small-orgs 4] [--small 5] [--limits] [--timeout 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factories import make_org, make_project, make_queue_item, make_user  # noqa: E402
from tests.provider import ProviderServer  # noqa: E402

from mf_worker.db import connect  # noqa: E402
from mf_worker.db.migrate import apply_migrations  # noqa: E402
from mf_worker.settings import load_settings  # noqa: E402

MODEL = "gpt-4o-mini"


def _with_database(url: str, name: str) -> str:
    return make_conninfo("", **{**conninfo_to_dict(url), "dbname": name})


@contextmanager
def bench_database(admin_url: str) -> Iterator[str]:
    name = f"mf_bench_burst_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(admin_url, name)
    try:
        asyncio.run(_migrate(url))
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


async def _migrate(url: str) -> None:
    settings, _ = load_settings(environ={}, overrides={"database_url": url})
    conn = await connect(settings)
    async with conn:
        await apply_migrations(conn)


def seed(url: str, args: argparse.Namespace, due: datetime) -> dict[str, str]:
    """The items; returns organisation id → label (``big``, ``small1`` …)."""
    labels: dict[str, str] = {}
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        groups = [("big", args.big, due - timedelta(seconds=args.lead))]
        groups += [(f"small{i + 1}", args.small, due) for i in range(args.small_orgs)]
        for label, count, when in groups:
            org = make_org(conn, name=f"Bench {label}")
            labels[org["id"]] = label
            user = make_user(conn, org)
            with conn.transaction():
                for _ in range(count):
                    project = make_project(conn, user, title=f"{label} project")
                    make_queue_item(conn, project, scheduled_for=when)
    return labels


def start_workers(url: str, args: argparse.Namespace, base_url: str, logs: Path
                  ) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.pop("DATABASE_URL", None)
    env.update({
        "MF_DATABASE_URL": url, "MF_GENERATOR": "openai", "MF_LLM_BASE_URL": base_url,
        "MF_LLM_MODEL": MODEL, "MF_LLM_TIMEOUT": "30", "MF_LLM_MAX_TOKENS": str(args.max_tokens),
        "MF_CONCURRENCY": str(args.concurrency), "MF_METRICS_ADDR": "",
        "MF_LOG_FORMAT": "json", "MF_LOG_LEVEL": "warning", "MF_POLL_INTERVAL": "1",
        "MF_SCHEDULER_INTERVAL": "3600", "PYTHONPATH": str(ROOT),
    })
    if args.limits:
        env["MF_LLM_REQUESTS_PER_MINUTE"] = str(args.rpm)
        if args.tpm:
            env["MF_LLM_TOKENS_PER_MINUTE"] = str(args.tpm)
    procs = []
    for index in range(args.processes):
        log = (logs / f"worker{index}.log").open("ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mf_worker", "run"], stdout=log, stderr=subprocess.STDOUT,
            env={**env, "MF_WORKER_ID": f"bench-{index}"}, cwd=ROOT))
    return procs


def open_items(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) AS n FROM episode_schedule_queue"
                       " WHERE status IN ('pending', 'processing') AND scheduled_for <= now()"
                       ).fetchone()
    return int(row["n"]) if row else 0


def report(url: str, args: argparse.Namespace, labels: dict[str, str], provider: ProviderServer,
           first_due: datetime, open_left: int) -> None:
    n = args.big + args.small_orgs * args.small
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        statuses = {r["status"]: r["n"] for r in conn.execute(
            "SELECT status, count(*) AS n FROM episode_schedule_queue"
            " WHERE scheduled_for <= now() GROUP BY status")}
        last = conn.execute("SELECT max(completed_at) AS t FROM episode_schedule_queue"
                            " WHERE status = 'completed'").fetchone()
        firsts = {r["organization_id"]: r["t"] for r in conn.execute(
            "SELECT organization_id, min(completed_at) AS t FROM episode_schedule_queue"
            " WHERE status = 'completed' GROUP BY organization_id")}
        put_back = {r["organization_id"]: r for r in conn.execute(
            "SELECT organization_id, sum(deferred_count) AS deferred,"
            " sum(retry_count) AS retried, min(picked_up_at) AS first_pick"
            " FROM episode_schedule_queue WHERE scheduled_for <= now()"
            " GROUP BY organization_id")}
        errors = conn.execute(
            "SELECT left(last_error, 60) AS last_error, count(*) AS n"
            " FROM episode_schedule_queue WHERE status = 'failed'"
            " GROUP BY 1 ORDER BY n DESC LIMIT 3").fetchall()
    counts = provider.counts()
    accepted = max(counts["accepted"], 1)
    ideal = n / args.rpm * 60
    drain = (last["t"] - first_due).total_seconds() if last and last["t"] else float("nan")
    print(f"scenario: N={n} items ({args.big} of one organisation due {args.lead:g} s early, "
          f"{args.small_orgs}×{args.small}), {args.processes} processes × concurrency "
          f"{args.concurrency}, provider {args.rpm:g} requests/min"
          + (f", {args.tpm:g} tokens/min" if args.tpm else "")
          + f", latency {args.latency:g} s, limits {'set' if args.limits else 'not set'}")
    print(f"items: completed {statuses.get('completed', 0)}, failed {statuses.get('failed', 0)}, "
          f"still open {open_left}")
    for row in errors:
        print(f"  failed with: {row['n']} × {row['last_error']}…")
    print(f"provider: accepted {counts['accepted']}, 429 {counts['rate_limited']} "
          f"({counts['rate_limited'] / accepted:.1%} of accepted; target ≤ 10 %), "
          f"503 {counts['unavailable']}, quota {counts['quota_rejected']}")
    print(f"drain: {drain:.1f} s against N ÷ R = {ideal:.1f} s "
          f"(ratio {drain / ideal:.2f}; target ≤ 1.30)")
    for org_id, label in labels.items():
        first = firsts.get(org_id)
        if first is None:
            print(f"  {label:8} first episode: none")
            continue
        at = (first - first_due).total_seconds()
        share = at / drain if drain and drain == drain else float("nan")
        target = " (target ≤ 20 %)" if label != "big" else ""
        back = put_back.get(org_id)
        extra = "" if back is None else (
            f"; first picked up at {(back['first_pick'] - first_due).total_seconds():.1f} s,"
            f" {back['deferred']} deferrals, {back['retried']} transient retries")
        print(f"  {label:8} first episode at {at:6.1f} s = {share:.0%} of the drain{target}"
              + extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rpm", type=float, default=120)
    parser.add_argument("--tpm", type=float, default=None)
    parser.add_argument("--burst", type=float, default=3.0,
                        help="seconds of its rate the provider's buckets hold")
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--big", type=int, default=120)
    parser.add_argument("--small-orgs", type=int, default=4)
    parser.add_argument("--small", type=int, default=5)
    parser.add_argument("--lead", type=float, default=2.0,
                        help="seconds the big organisation's items are due before the rest")
    parser.add_argument("--limits", action="store_true",
                        help="give the workers MF_LLM_REQUESTS_PER_MINUTE (and _TOKENS_)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")

    with bench_database(admin_url) as url, tempfile.TemporaryDirectory() as tmp, \
            ProviderServer(requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                           burst_seconds=args.burst, latency=args.latency,
                           lifetime=args.timeout + 120) as provider:
        due = datetime.now(UTC) + timedelta(seconds=1)
        labels = seed(url, args, due)
        first_due = due - timedelta(seconds=args.lead)
        procs = start_workers(url, args, provider.base_url, Path(tmp))
        deadline = time.monotonic() + args.timeout
        left = -1
        try:
            with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
                time.sleep(max((due - datetime.now(UTC)).total_seconds(), 0) + 0.5)
                while time.monotonic() < deadline:
                    left = open_items(conn)
                    if left == 0 or any(p.poll() is not None for p in procs):
                        break
                    time.sleep(0.25)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        crashed = [p.returncode for p in procs if p.returncode not in (0, None)]
        if crashed:
            print(f"workers exited with {crashed}; last log lines:")
            for log in sorted(Path(tmp).glob("*.log")):
                print("".join(log.read_text().splitlines(keepends=True)[-5:]))
        report(url, args, labels, provider, first_due, left)


if __name__ == "__main__":
    main()
