"""Claims are fair across organisations: among due items, every organisation's earliest item is
claimed before any organisation's second, so one organisation's backlog cannot starve the rest;
and ``MF_ORG_MAX_IN_FLIGHT`` caps how many of one organisation's items process at once.
Against a real PostgreSQL, through ``queue.claim_due_items``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mf_worker import queue
from mf_worker.queue import ClaimedItem

from .factories import make_org, make_project, make_queue_item, make_user

Conn = psycopg.Connection[dict[str, Any]]
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def org_with_items(conn: Conn, count: int, due: datetime, name: str) -> str:
    org = make_org(conn, name=name)
    user = make_user(conn, org)
    for index in range(count):
        project = make_project(conn, user)
        make_queue_item(conn, project, scheduled_for=due + timedelta(milliseconds=index))
    return str(org["id"])


def claim(db_url: str, limit: int, *, worker: str = "w1", org_cap: int | None = None
          ) -> list[ClaimedItem]:
    async def main() -> list[ClaimedItem]:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True,
                                                     row_factory=dict_row)
        async with conn:
            cap: dict[str, Any] = {} if org_cap is None else {"org_max_in_flight": org_cap}
            return await queue.claim_due_items(conn, worker=worker, limit=limit,
                                               lease_seconds=60, now=NOW, **cap)

    return asyncio.run(main())


def test_every_organisations_earliest_item_is_claimed_before_anyones_second(
    db_url: str, db: Conn
) -> None:
    # The big organisation's 20 items fell due a minute before the three small ones' items.
    big = org_with_items(db, 20, NOW - timedelta(minutes=1), "big")
    small = [org_with_items(db, 2, NOW - timedelta(seconds=1), f"small{i}") for i in range(3)]

    first = claim(db_url, 4)
    assert sorted(i.organization_id for i in first) == sorted([big, *small])
    second = claim(db_url, 4, worker="w2")
    # Then every organisation's second item.
    assert sorted(i.organization_id for i in second) == sorted([big, *small])
    rest = claim(db_url, 100)
    assert [i.organization_id for i in rest] == [big] * 18
    # Within an organisation, items still go in due order.
    mine = [i for i in first + second + rest if i.organization_id == big]
    assert [i.scheduled_for for i in mine] == sorted(i.scheduled_for for i in mine)


def test_items_not_yet_due_are_never_claimed_for_fairness(db_url: str, db: Conn) -> None:
    due = org_with_items(db, 2, NOW - timedelta(seconds=5), "due")
    org_with_items(db, 2, NOW + timedelta(seconds=5), "later")
    assert [i.organization_id for i in claim(db_url, 10)] == [due, due]


def test_org_max_in_flight_caps_one_organisations_processing_items(
    db_url: str, db: Conn
) -> None:
    big = org_with_items(db, 10, NOW - timedelta(minutes=1), "big")
    small = org_with_items(db, 1, NOW, "small")
    first = claim(db_url, 10, org_cap=3)
    assert sorted(i.organization_id for i in first) == sorted([big] * 3 + [small])
    # Three of big's items are processing: another worker gets none of them until one ends.
    assert claim(db_url, 10, worker="w2", org_cap=3) == []
    db.execute("UPDATE episode_schedule_queue SET status = 'completed', completed_at = now(),"
               " locked_by = NULL, lease_expires_at = NULL WHERE id = %s", [first[0].id])
    again = claim(db_url, 10, worker="w2", org_cap=3)
    assert [i.organization_id for i in again] == [big]


def test_an_organisation_with_items_processing_waits_its_turn_behind_those_without(
    db_url: str, db: Conn
) -> None:
    """Claims one at a time (a paced fleet): the big organisation's earlier items do not win
    every claim once it has one processing; the small ones' first items come next."""
    big = org_with_items(db, 10, NOW - timedelta(minutes=1), "big")
    small = [org_with_items(db, 2, NOW - timedelta(seconds=1), f"small{i}") for i in range(2)]
    taken = [claim(db_url, 1, worker=f"w{n}")[0].organization_id for n in range(4)]
    assert taken[0] == big
    assert sorted(taken[1:3]) == sorted(small)
    assert taken[3] == big


def test_an_organisation_served_a_moment_ago_waits_behind_one_not_served_yet(
    db_url: str, db: Conn
) -> None:
    """Two small organisations' items fell due together. The first one's first item already
    completed; its second item must not go before the other organisation's first (with the
    same due time, the tie would otherwise go by id, serving one organisation entirely first)."""
    served = org_with_items(db, 3, NOW - timedelta(seconds=1), "served")
    waiting = org_with_items(db, 3, NOW - timedelta(seconds=1), "waiting")
    db.execute("UPDATE episode_schedule_queue SET status = 'completed', completed_at = %s"
               " WHERE id = (SELECT id FROM episode_schedule_queue WHERE organization_id = %s"
               "             ORDER BY scheduled_for, id LIMIT 1)", [NOW, served])
    db.execute("UPDATE episode_schedule_queue SET scheduled_for = %s, run_after = %s",
               [NOW - timedelta(seconds=1), NOW - timedelta(seconds=1)])
    first = claim(db_url, 1)
    assert [i.organization_id for i in first] == [waiting]


# --------------------------------------------------------------------------- many organisations

def many_orgs(db: Conn, orgs: int, items_each: int, due: datetime, prefix: str = "") -> list[str]:
    """``orgs`` organisations with ``items_each`` due items each, loaded in a few statements."""
    params = {"orgs": orgs, "each": items_each, "due": due, "p": f"many{prefix}"}
    db.execute("INSERT INTO organizations (id, name) SELECT 'org_' || %(p)s || lpad(o::text, 4,"
               " '0'), 'o' FROM generate_series(1, %(orgs)s) o", params)
    db.execute("INSERT INTO users (id, organization_id, email) SELECT 'usr_' || %(p)s || o,"
               " 'org_' || %(p)s || lpad(o::text, 4, '0'), %(p)s || o || '@example.com'"
               " FROM generate_series(1, %(orgs)s) o", params)
    db.execute("INSERT INTO projects (id, organization_id, user_id, title)"
               " SELECT 'prj_' || %(p)s || o || '_' || i, 'org_' || %(p)s || lpad(o::text, 4, '0'),"
               "        'usr_' || %(p)s || o, 't'"
               " FROM generate_series(1, %(orgs)s) o, generate_series(1, %(each)s) i", params)
    db.execute("INSERT INTO episode_schedule_queue (id, project_id, organization_id,"
               "                                    scheduled_for)"
               " SELECT 'queue_' || %(p)s || o || '_' || i, 'prj_' || %(p)s || o || '_' || i,"
               "        'org_' || %(p)s || lpad(o::text, 4, '0'),"
               "        %(due)s::timestamptz + i * interval '1 millisecond'"
               " FROM generate_series(1, %(orgs)s) o, generate_series(1, %(each)s) i", params)
    return [f"org_many{prefix}{o:04d}" for o in range(1, orgs + 1)]


def claims_in_turn(db_url: str, limit: int, times: int) -> list[list[ClaimedItem]]:
    """``times`` claims of ``limit`` by one process (one rotation), none of them completed."""
    async def main() -> list[list[ClaimedItem]]:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True,
                                                     row_factory=dict_row)
        rotation = queue.OrganizationRotation()
        async with conn:
            return [await queue.claim_due_items(conn, worker="w1", limit=limit,
                                                lease_seconds=60, now=NOW, rotation=rotation)
                    for _ in range(times)]

    return asyncio.run(main())


def _index_scans(db: Conn) -> int:
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute("SELECT coalesce(idx_scan, 0) AS n FROM pg_stat_user_tables"
                     " WHERE relname = 'episode_schedule_queue'").fetchone()
    assert row is not None
    return int(row["n"])


def test_a_claim_looks_at_a_bounded_number_of_organisations_however_many_are_due(
    db_url: str, db: Conn
) -> None:
    """#16: a claim's work must not grow with the fleet. With 200 organisations due, one claim
    of one item used to compute every organisation's turn (three index lookups each, 600 in
    all); now it looks at 4 × limit of them, taking turns from one claim to the next."""
    many_orgs(db, 200, 2, NOW - timedelta(minutes=1))
    db.execute("SELECT pg_stat_force_next_flush()")
    before = _index_scans(db)
    [items] = claims_in_turn(db_url, 1, 1)  # its connection flushes its statistics on close
    assert len(items) == 1
    assert _index_scans(db) - before < 60


def test_organisations_take_turns_when_more_are_due_than_a_claim_looks_at(
    db_url: str, db: Conn
) -> None:
    """200 organisations with two due items each (a backlog larger than a claim's first look):
    200 claims of one item by one process take every organisation's first item before any
    organisation's second, as with few organisations."""
    orgs = many_orgs(db, 200, 2, NOW - timedelta(minutes=1))
    claimed = [item for batch in claims_in_turn(db_url, 1, 200) for item in batch]
    assert sorted(i.organization_id for i in claimed) == sorted(orgs)


def test_one_organisations_backlog_does_not_hide_the_others_among_many(
    db_url: str, db: Conn
) -> None:
    """One organisation has 400 items that fell due an hour ago (more than a claim's first look
    reads); 40 others have one item each, due now. Within 30 claims of two items, every one of
    the 40 has had its item claimed: the walk over the organisations finds them behind the
    backlog, and the busy organisation waits its turn."""
    [big] = many_orgs(db, 1, 400, NOW - timedelta(hours=1), prefix="big")
    small = many_orgs(db, 40, 1, NOW - timedelta(seconds=1), prefix="small")
    claimed = [item for batch in claims_in_turn(db_url, 2, 30) for item in batch]
    assert set(small) <= {i.organization_id for i in claimed}
    assert big in {i.organization_id for i in claimed}


def test_a_backlog_among_many_idle_organisations_is_claimed_at_every_claim(
    db_url: str, db: Conn
) -> None:
    """One organisation has 200 due items (more than a claim's first look reads) and 300 others
    have only items due tomorrow. Every claim takes an item: the walk over the organisations may
    not reach the busy one within its steps, so the organisations of the earliest due items
    come in too (a claim that came back empty would send the worker to sleep with work due)."""
    many_orgs(db, 300, 1, NOW + timedelta(days=1), prefix="idle")
    [busy] = many_orgs(db, 1, 200, NOW - timedelta(minutes=5), prefix="zzz")
    batches = claims_in_turn(db_url, 1, 10)
    assert [len(b) for b in batches] == [1] * 10
    assert {i.organization_id for b in batches for i in b} == {busy}
