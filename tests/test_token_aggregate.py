"""The daily token aggregate is maintained by a trigger and stays exact under concurrent inserts."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from mf_worker.db import connect
from mf_worker.db import migrate as migrate_mod
from mf_worker.db.migrate import load_migrations

from .conftest import settings_for
from .factories import make_queue_item, make_tenant

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


def _insert_at_hours(url: str, org: str, seed: int, count: int,
                     barrier: threading.Barrier) -> None:
    rng = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as conn:
        barrier.wait()
        for _ in range(count):
            hour = rng.choice((3, 9, 10, 17))  # few hours, so their totals race and tie often
            conn.execute(
                "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
                " completion_tokens, cost_gbp, created_at)"
                " VALUES (%s, 'episode_generation', 'm', %s, 0, 0, %s)",
                [org, rng.randint(0, 50), f"2026-05-04T{hour:02d}:{rng.randint(0, 59):02d}:00Z"],
            )


def test_hourly_peak_is_the_busiest_utc_hour_after_concurrent_inserts(
    db_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """hourly_peak/peak_hour equal what the raw rows say (the earliest hour on a tie), even when
    eight connections insert into the same day's row at once."""
    org = make_tenant(db)["org"]["id"]
    threads, per_thread = 8, 60
    barrier = threading.Barrier(threads)
    workers = [
        threading.Thread(target=_insert_at_hours, args=(db_url, org, seed, per_thread, barrier))
        for seed in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    expected = db.execute(
        "SELECT extract(hour FROM created_at AT TIME ZONE 'UTC')::int AS hour,"
        " sum(total_tokens) AS tokens FROM token_usage GROUP BY 1"
        " ORDER BY tokens DESC, hour LIMIT 1"
    ).fetchone()
    assert expected is not None
    row = db.execute(
        "SELECT hourly_peak, peak_hour FROM token_usage_daily WHERE organization_id = %s"
        " AND date = '2026-05-04'", [org]
    ).fetchone()
    assert row == {"hourly_peak": expected["tokens"], "peak_hour": expected["hour"]}


def test_hourly_peak_follows_the_hour_that_overtakes(
    db: psycopg.Connection[dict[str, Any]]
) -> None:
    """A later hour that overtakes the peak becomes peak_hour; a tie keeps the earlier hour;
    hours are UTC whatever the inserting timestamp's offset."""
    org = make_tenant(db)["org"]["id"]

    def use(tokens: int, at: str) -> dict[str, Any] | None:
        db.execute(
            "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
            " completion_tokens, cost_gbp, created_at)"
            " VALUES (%s, 'chat', 'm', %s, 0, 0, %s)", [org, tokens, at],
        )
        return db.execute(
            "SELECT hourly_peak, peak_hour FROM token_usage_daily WHERE organization_id = %s",
            [org],
        ).fetchone()

    assert use(100, "2026-05-04T08:10:00Z") == {"hourly_peak": 100, "peak_hour": 8}
    assert use(60, "2026-05-04T14:00:00+02:00") == {"hourly_peak": 100, "peak_hour": 8}
    assert use(40, "2026-05-04T12:59:59Z") == {"hourly_peak": 100, "peak_hour": 8}  # tie: 8
    assert use(1, "2026-05-04T12:30:00Z") == {"hourly_peak": 101, "peak_hour": 12}
    assert use(50, "2026-05-04T08:00:00Z") == {"hourly_peak": 150, "peak_hour": 8}


def test_migration_0006_fills_hourly_peak_for_existing_days(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Days aggregated before the columns existed get hourly_tokens, hourly_peak and peak_hour
    from their raw rows when migration 0006 runs; later inserts continue from there."""
    everything = load_migrations()
    monkeypatch.setattr(migrate_mod, "load_migrations",
                        lambda: [m for m in everything if m.version < 6])

    async def migrate() -> None:
        conn = await connect(settings_for(empty_db_url))
        async with conn:
            await migrate_mod.apply_migrations(conn)

    asyncio.run(migrate())
    with psycopg.connect(empty_db_url, autocommit=True, row_factory=dict_row) as db:
        org = make_tenant(db)["org"]["id"]

        def use(tokens: int, at: str) -> None:
            db.execute(
                "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
                " completion_tokens, cost_gbp, created_at)"
                " VALUES (%s, 'chat', 'm', %s, 0, 0, %s)", [org, tokens, at],
            )

        use(30, "2026-05-04T07:10:00Z")
        use(50, "2026-05-04T21:10:00Z")
        use(20, "2026-05-04T07:50:00Z")
        monkeypatch.setattr(migrate_mod, "load_migrations", lambda: everything)
        asyncio.run(migrate())
        row = db.execute("SELECT hourly_tokens, hourly_peak, peak_hour FROM token_usage_daily"
                         " WHERE organization_id = %s", [org]).fetchone()
        assert row is not None
        assert (row["hourly_peak"], row["peak_hour"]) == (50, 7)  # tie 50/50: the earlier hour
        assert row["hourly_tokens"][7] == 50 and row["hourly_tokens"][21] == 50
        assert sum(row["hourly_tokens"]) == 100
        use(1, "2026-05-04T21:59:00Z")
        assert db.execute("SELECT hourly_peak, peak_hour FROM token_usage_daily"
                          " WHERE organization_id = %s", [org]).fetchone() == {
            "hourly_peak": 51, "peak_hour": 21}


def _usage(conn: psycopg.Connection[Any], org_id: str, cost: str) -> None:
    conn.execute(
        "INSERT INTO token_usage (organization_id, operation, model, prompt_tokens,"
        " completion_tokens, cost_gbp) VALUES (%s, 'episode_generation', 'm', 10, 5, %s)",
        [org_id, Decimal(cost)])


def test_usage_in_an_open_transaction_does_not_hold_the_organisations_daily_row(
    db_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """Issue #28: one organisation's final writes must not queue on its row of the aggregate for
    the length of each other's transactions. A transaction that booked usage and is still open
    (a batch of final writes on its way) leaves the row free for another transaction's usage,
    which commits without waiting; the aggregate is still exact once both have committed."""
    org = make_tenant(db)["org"]["id"]
    _usage(db, org, "0.10")  # the day's row exists, as it does after the first episode
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        _usage(first, org, "0.20")  # open: not committed yet
        second.execute("SET lock_timeout = '2s'")
        _usage(second, org, "0.30")  # waiting for `first` would end in LockNotAvailable
        second.commit()
        first.commit()
    row = db.execute("SELECT total_cost_gbp, total_tokens FROM token_usage_daily"
                     " WHERE organization_id = %s", [org]).fetchone()
    assert row == {"total_cost_gbp": Decimal("0.60"), "total_tokens": 45}


def test_a_settled_reservation_in_an_open_transaction_does_not_hold_the_daily_row(
    db_url: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """The final write also settles the item's reservation (its status leaves 'processing'):
    neither that nor the usage it books takes the organisation's row before the commit, and
    until then the reservation still counts, so the limit check of another transaction stays
    on the safe side; after the commit the reservation is gone and the real cost booked."""
    tenant = make_tenant(db)
    org = tenant["org"]["id"]
    db.execute("INSERT INTO token_usage_daily (organization_id, date, reserved_gbp)"
               " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, 0.50)", [org])
    item = make_queue_item(db, tenant["project"], status="processing", locked_by="w", claim_token=1,
                           lease_expires_at=datetime.now(UTC) + timedelta(minutes=5),
                           reserved_cost_gbp=Decimal("0.50"),
                           reserved_on=datetime.now(UTC).date())
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        first.execute("UPDATE episode_schedule_queue SET status = 'completed',"
                      " completed_at = now(), reserved_cost_gbp = NULL WHERE id = %s",
                      [item["id"]])
        _usage(first, org, "0.40")
        second.execute("SET lock_timeout = '2s'")
        seen = second.execute(
            "SELECT reserved_gbp FROM token_usage_daily WHERE organization_id = %s FOR UPDATE",
            [org]).fetchone()
        assert seen == (Decimal("0.50"),)  # not committed yet: still reserved
        second.commit()
        first.commit()
    row = db.execute("SELECT total_cost_gbp, reserved_gbp, estimated_cost_gbp"
                     " FROM token_usage_daily WHERE organization_id = %s", [org]).fetchone()
    assert row == {"total_cost_gbp": Decimal("0.40"), "reserved_gbp": 0,
                   "estimated_cost_gbp": 0}
