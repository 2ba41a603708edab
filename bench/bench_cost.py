"""What the daily cost-limit check costs: the aggregate row versus a SUM over raw usage rows.

For an organisation with N usage rows today (10k and 1M by default) it times, side by side in
one run, the check mf-worker does (read the organisation's row of ``token_usage_daily`` with its
limit, the ``read_daily_budget`` query) and the naive one the source design warned about
(``SUM`` over today's ``token_usage`` rows, served by the (organization_id, created_at) index).
It prints the median per check and the ratio. Figures only; nothing here asserts on time.

    .venv/bin/python bench/bench_cost.py [--sizes 10000 1000000] [--repeat 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mf_worker.db import connect
from mf_worker.db.migrate import apply_migrations
from mf_worker.db.sql import load_queries
from mf_worker.settings import load_settings

RAW_SUM = """
SELECT coalesce(sum(cost_gbp), 0) AS spent
FROM token_usage
WHERE organization_id = %(organization_id)s
  AND created_at >= %(day_start)s AND created_at < %(day_start)s + interval '1 day'
"""

SEED = [
    "INSERT INTO organizations (id, name) VALUES ('org_bench', 'Bench'), ('org_other', 'Other')",
    # Seed fast without the per-row trigger, then build the aggregate the trigger would have.
    "ALTER TABLE token_usage DISABLE TRIGGER token_usage_maintain_daily",
    """
    INSERT INTO token_usage (id, organization_id, operation, model, prompt_tokens,
                             completion_tokens, cost_gbp, created_at)
    SELECT 'tok_' || g, CASE WHEN g % 10 = 0 THEN 'org_other' ELSE 'org_bench' END,
           'episode_generation', 'gpt-4o', 1000 + g % 500, 200 + g % 300, 0.000123,
           date_trunc('day', now()) + (g % 80000) * interval '1 second'
    FROM generate_series(1, %(rows)s) g
    """,
    "ALTER TABLE token_usage ENABLE TRIGGER token_usage_maintain_daily",
    """
    INSERT INTO token_usage_daily (organization_id, date, total_tokens, total_cost_gbp,
                                   episode_count)
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, sum(total_tokens),
           sum(cost_gbp), count(*)
    FROM token_usage GROUP BY 1, 2
    """,
    "ANALYZE",
]


async def measure(url: str, rows: int, repeat: int) -> tuple[float, float, int]:
    settings, _ = load_settings(environ={}, overrides={"database_url": url})
    conn = await connect(settings)
    async with conn:
        await apply_migrations(conn)
        for statement in SEED:
            sql = statement.replace("%(rows)s", str(int(rows)))
            await conn.execute(sql)  # type: ignore[arg-type]
        params = {"organization_id": "org_bench", "date": datetime.now(UTC).date(),
                  "default_limit": Decimal(50),
                  "day_start": datetime.now(UTC).replace(hour=0, minute=0, second=0,
                                                         microsecond=0)}
        org_rows = (await (await conn.execute(
            "SELECT count(*) AS n FROM token_usage WHERE organization_id = 'org_bench'"
        )).fetchone() or {"n": 0})["n"]

        async def timed(query: str) -> float:
            samples = []
            for _ in range(5):  # warm caches and plans
                await conn.execute(query, params)  # type: ignore[arg-type]
            for _ in range(repeat):
                started = time.perf_counter()
                await (await conn.execute(query, params)).fetchone()  # type: ignore[arg-type]
                samples.append(time.perf_counter() - started)
            return statistics.median(samples)

        check = load_queries("mf_worker.cost", "budget.sql")["read_daily_budget"]
        return await timed(check), await timed(RAW_SUM), org_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    admin = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")
    print(f"limit check, median of {args.repeat} checks per size (lower is better)")
    print(f"{'usage rows (org)':>17} {'aggregate ms':>13} {'raw SUM ms':>11} {'SUM/aggregate':>14}")
    for size in args.sizes:
        name = f"mf_bench_cost_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_conninfo("", **{**conninfo_to_dict(admin), "dbname": name})
            agg, raw, org_rows = asyncio.run(measure(url, size, args.repeat))
            print(f"{org_rows:>17,} {agg * 1000:>13.3f} {raw * 1000:>11.3f} {raw / agg:>13.0f}x")
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
