"""What the fair claim costs: `claim_due_items` with 100,000 due items across 1,000 organisations.

Seeds ``--items`` due pending items spread evenly over ``--orgs`` organisations (one project
each item, as the queue allows one open item per project; a tenth of the organisations also
have an item processing), then times, interleaved in one run, the claim as shipped
(``queue.claim_due_items`` as one process makes it: choosing the organisations, then one
statement with ``FOR UPDATE SKIP LOCKED`` in which items at or past their instant go first and
each organisation's due items take turns after those it has processing or just completed)
and, for comparison, the claim before fair ordering (due items earliest deadline first,
nothing else). Each claim of ``--limit`` items runs in a
transaction that is rolled back, so every repetition sees the same queue. Prints the median
and 90th percentile per claim. Figures only: nothing here asserts. Uses a throwaway database
on ``MF_BENCH_DATABASE_URL`` (default ``postgresql:///postgres``).

    .venv/bin/python bench/bench_claim.py [--items 100000] [--orgs 1000] [--limit 16]
        [--repeat 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_burst import bench_database  # noqa: E402

from mf_worker import queue  # noqa: E402

# The claim before fair ordering (issue #13): due items earliest deadline first, nothing else.
BY_DEADLINE = """
WITH due AS (
    SELECT id FROM episode_schedule_queue
    WHERE status = 'pending' AND run_after <= coalesce(%(now)s, now())
    ORDER BY scheduled_for, run_after, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE episode_schedule_queue AS q
SET status = 'processing', attempt_count = q.attempt_count + 1,
    picked_up_at = coalesce(q.picked_up_at, coalesce(%(now)s, now())),
    last_attempt_at = coalesce(%(now)s, now()), locked_by = %(worker)s,
    claim_token = nextval('episode_schedule_queue_claim_token_seq'),
    lease_expires_at = coalesce(%(now)s, now()) + make_interval(secs => %(lease_seconds)s)
FROM due WHERE q.id = due.id
RETURNING q.id
"""

SEED = """
INSERT INTO organizations (id, name)
SELECT 'org_b' || o, 'Bench ' || o FROM generate_series(1, %(orgs)s) AS o;
INSERT INTO users (id, organization_id, email, timezone)
SELECT 'usr_b' || o, 'org_b' || o, 'u' || o || '@example.com', 'Europe/London'
FROM generate_series(1, %(orgs)s) AS o;
INSERT INTO projects (id, organization_id, user_id, title, description, cadence_config)
SELECT 'prj_b' || i, 'org_b' || (i %% %(orgs)s + 1), 'usr_b' || (i %% %(orgs)s + 1),
       'Project ' || i, 'A brief.', '{"mode": "daily", "days": []}'
FROM generate_series(1, %(items)s) AS i;
INSERT INTO episode_schedule_queue (id, project_id, organization_id, scheduled_for, run_after)
SELECT 'queue_b' || i, 'prj_b' || i, 'org_b' || (i %% %(orgs)s + 1),
       now() - make_interval(secs => i %% 3600), now() - make_interval(secs => i %% 3600)
FROM generate_series(1, %(items)s) AS i;
UPDATE episode_schedule_queue
SET status = 'processing', locked_by = 'elsewhere',
    claim_token = nextval('episode_schedule_queue_claim_token_seq'),
    lease_expires_at = now() + interval '1 hour', attempt_count = 1
WHERE id IN (SELECT 'queue_b' || i FROM generate_series(1, %(orgs)s, 10) AS i);
ANALYZE;
"""


def timed(conn: psycopg.Connection[Any], query: Any, params: dict[str, Any]) -> tuple[float, int]:
    with conn.transaction(force_rollback=True):
        started = time.perf_counter()
        rows = conn.execute(query, params).fetchall()
        return time.perf_counter() - started, len(rows)


async def timed_claim(conn: psycopg.AsyncConnection[Any], rotation: queue.OrganizationRotation,
                      org_max_in_flight: int | None, limit: int) -> tuple[float, int]:
    """The claim as the worker makes it (`queue.claim_due_items`: choosing the organisations,
    then the claim statement), rolled back."""
    async with conn.transaction(force_rollback=True):
        started = time.perf_counter()
        items = await queue.claim_due_items(conn, worker="bench", limit=limit,
                                            lease_seconds=60,
                                            org_max_in_flight=org_max_in_flight,
                                            rotation=rotation)
        return time.perf_counter() - started, len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--orgs", type=int, default=1_000)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")
    with bench_database(admin_url) as url:
        with psycopg.connect(url, row_factory=dict_row) as conn:
            started = time.perf_counter()
            with conn.transaction():
                for statement in SEED.split(";\n"):
                    if statement.strip():
                        conn.execute(statement, {"orgs": args.orgs, "items": args.items})
            print(f"seeded {args.items:,} due items across {args.orgs:,} organisations "
                  f"in {time.perf_counter() - started:.1f} s")
        asyncio.run(measure(url, args))


async def measure(url: str, args: argparse.Namespace) -> None:
    """Interleaved: the claim as shipped (as one process makes it, rotation and all), the same
    with an organisation cap, and the claim before fair ordering."""
    params = {"worker": "bench", "limit": args.limit, "lease_seconds": 60, "now": None,
              "org_max_in_flight": None}
    rotations = {name: queue.OrganizationRotation() for name in ("fair", "capped")}
    times: dict[str, list[float]] = {"fair": [], "fair, MF_ORG_MAX_IN_FLIGHT=4": [],
                                     "earliest deadline only (before)": []}
    counts: dict[str, int] = {}
    aconn = await psycopg.AsyncConnection.connect(url, row_factory=dict_row)
    with psycopg.connect(url, row_factory=dict_row) as conn:
        async with aconn:
            for _ in range(args.repeat):
                for name, cap, rotation in (
                        ("fair", None, rotations["fair"]),
                        ("fair, MF_ORG_MAX_IN_FLIGHT=4", 4, rotations["capped"])):
                    seconds, claimed = await timed_claim(aconn, rotation, cap, args.limit)
                    times[name].append(seconds)
                    counts[name] = claimed
                name = "earliest deadline only (before)"
                seconds, claimed = timed(conn, BY_DEADLINE, params)
                times[name].append(seconds)
                counts[name] = claimed
    for name, samples in times.items():
        samples.sort()
        p90 = samples[int(0.9 * (len(samples) - 1))]
        print(f"{name:32} median {statistics.median(samples) * 1000:7.2f} ms, "
              f"p90 {p90 * 1000:7.2f} ms per claim of {counts[name]} items")


if __name__ == "__main__":
    main()
