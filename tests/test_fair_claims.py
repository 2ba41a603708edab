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
