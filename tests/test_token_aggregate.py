"""The daily token aggregate is maintained by a trigger and stays exact under concurrent inserts."""

from __future__ import annotations

import random
import threading
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .factories import make_tenant

OPERATIONS = ("episode_generation", "project_onboarding", "chat")


def _insert_many(url: str, org_ids: list[str], seed: int, count: int,
                 barrier: threading.Barrier) -> None:
    rng = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as conn:
        barrier.wait()
        for _ in range(count):
            conn.execute(
                "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
                " completion_tokens, cost_gbp) VALUES (%s, %s, 'gpt-x', %s, %s, %s)",
                [rng.choice(org_ids), rng.choice(OPERATIONS), rng.randint(0, 5000),
                 rng.randint(0, 5000), Decimal(rng.randint(0, 10**6)) / 10**6],
            )


def test_daily_aggregate_equals_raw_rows_after_concurrent_inserts(
    db_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    orgs = [make_tenant(db)["org"]["id"] for _ in range(3)]
    threads, per_thread = 8, 150
    barrier = threading.Barrier(threads)
    workers = [
        threading.Thread(target=_insert_many, args=(db_url, orgs, seed, per_thread, barrier))
        for seed in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    # Grouped by UTC day as the trigger groups them: inserts that straddle midnight UTC land
    # in two rows per organisation, and the test must not fail for it.
    raw = {
        (r["organization_id"], r["day"], r["operation"]): r
        for r in db.execute(
            "SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date AS day, operation,"
            " sum(total_tokens) AS tokens, sum(cost_gbp) AS cost, count(*) AS n"
            " FROM token_usage GROUP BY 1, 2, 3"
        ).fetchall()
    }
    assert sum(r["n"] for r in raw.values()) == threads * per_thread
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        daily = conn.execute(
            "SELECT * FROM token_usage_daily ORDER BY organization_id, date"
        ).fetchall()
    assert {d["organization_id"] for d in daily} == set(orgs)
    assert {(d["organization_id"], d["date"]) for d in daily} == {k[:2] for k in raw}
    for day in daily:
        org = (day["organization_id"], day["date"])
        rows = [raw[(*org, op)] for op in OPERATIONS if (*org, op) in raw]
        assert day["total_tokens"] == sum(r["tokens"] for r in rows)
        assert day["total_cost_gbp"] == sum(r["cost"] for r in rows)
        assert day["episode_count"] == raw.get((*org, "episode_generation"), {"n": 0})["n"]
        for op in OPERATIONS:
            if (*org, op) not in raw:
                continue
            entry = day["operation_breakdown"][op]
            assert entry["tokens"] == raw[(*org, op)]["tokens"]
            assert Decimal(str(entry["cost"])) == raw[(*org, op)]["cost"]


def test_usage_on_different_utc_days_lands_in_different_rows(
    db: psycopg.Connection[dict[str, Any]]
) -> None:
    org = make_tenant(db)["org"]["id"]
    for ts in ("2026-03-01T23:59:59+00:00", "2026-03-02T00:00:00+00:00",
               "2026-03-02T01:30:00+02:00"):  # the last one is 23:30 UTC on 1 March
        db.execute(
            "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
            " completion_tokens, cost_gbp, created_at)"
            " VALUES (%s, 'episode_generation', 'm', 10, 5, 0.5, %s)", [org, ts],
        )
    rows = db.execute(
        "SELECT date::text AS date, total_tokens, episode_count FROM token_usage_daily"
        " ORDER BY date"
    ).fetchall()
    assert rows == [
        {"date": "2026-03-01", "total_tokens": 30, "episode_count": 2},
        {"date": "2026-03-02", "total_tokens": 15, "episode_count": 1},
    ]
