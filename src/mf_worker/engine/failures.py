"""The outcomes other than success, written one item at a time (they are rare).

A failed attempt (``write_failure``: retry after a backoff, or fail for good), a call that does
not use up an attempt (``write_deferral``), an item whose project is gone or inactive
(``cancel_item``), and the reaper's verdict on attempts whose worker was lost
(``record_lost_attempts``). Each one that ends a call adds it to the episode's history
(``generation_attempts``, ``generation_errors``), and settles the attempt's spend in the same
transaction (``cost.settle``): ``bookings`` are what the attempt's provider calls owe
(``cost.settlement``: answered calls' usage, the worst case of unknown ones, nothing for refused
ones); None leaves the reservation to the queue's trigger, which books it whole as an estimate.
A hand-back at shutdown after the call started (``write_release``) is settled the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .. import cost, queue
from ..cost import Booking
from ..db import Connection, act_for, as_org
from ..db.sql import load_queries
from ..errors import LeaseLost
from ..queue import ClaimedItem
from .prepare import Prepared

_Q = load_queries(__package__ or "mf_worker.engine", "failures.sql")


async def cancel_item(conn: Connection, item: ClaimedItem, *, reason: str) -> bool:
    """Cancel an item whose project is gone or inactive (the queue's trigger fails the episode
    an earlier attempt started); False if the fence no longer holds."""
    async with as_org(conn, item.organization_id):
        return await queue.finish_item(conn, item, status="cancelled", error=reason)


async def write_failure(
    conn: Connection,
    item: ClaimedItem,
    prepared: Prepared | None,
    *,
    error: str,
    retry_in: float | None,
    bookings: Sequence[Booking] | None = None,
) -> bool:
    """Record a failed attempt: retry after ``retry_in`` seconds, or fail for good (``retry_in``
    None; the queue's trigger then fails the episode). Settles the attempt's spend in the same
    transaction: ``bookings`` on the reservation's day (None: the queue's trigger books the
    reserved worst case as an estimate). Raises LeaseLost when the fence no longer holds
    (nothing written)."""
    episode_id = prepared.episode_id if prepared else item.episode_id
    settled = bookings is not None and prepared is not None
    async with as_org(conn, item.organization_id):
        if retry_in is None:
            held = await queue.finish_item(conn, item, status="failed", error=error,
                                           settled=settled)
        else:
            held = await queue.retry_item(conn, item, delay_seconds=retry_in, error=error,
                                          settled=settled)
        if not held:
            raise LeaseLost(item.id)
        if settled:
            assert prepared is not None and bookings is not None
            await cost.settle(conn, item, day=prepared.billing_day, episode_id=episode_id,
                              bookings=bookings)
        if episode_id is not None:
            await conn.execute(
                _Q["record_episode_error"],
                {"episode_id": episode_id, "error": f"attempt {item.attempt}: {error}"},
            )
    return True


async def write_deferral(
    conn: Connection,
    item: ClaimedItem,
    prepared: Prepared | None,
    *,
    reason: str,
    error: str,
    retry_after: float | None,
    deadline_seconds: float,
    not_after: datetime | None,
    backoff: tuple[float, float, float],
    bookings: Sequence[Booking] | None = None,
) -> queue.Deferral:
    """Put the item back without using up its attempt (``queue.defer_item``). A transient
    failure's call goes into the episode's history; when the item gives up, the queue's
    trigger fails the episode. Whatever the reason, the attempt's spend is settled like a
    failed attempt's (``bookings``: a refused call owes nothing, but a billed draft before a
    refused repair does); a rate limit or an exhausted quota without ``bookings`` releases the
    reservation unbooked (the provider refused the call), a transient failure without them
    books it as an estimate. Raises LeaseLost when the fence no longer holds (nothing
    written)."""
    episode_id = prepared.episode_id if prepared else item.episode_id
    settled = bookings is not None and prepared is not None
    async with as_org(conn, item.organization_id):
        deferral = await queue.defer_item(
            conn, item, reason=reason, error=error, retry_after=retry_after,
            deadline_seconds=deadline_seconds, not_after=not_after, backoff=backoff,
            settled=settled)
        if deferral is None:
            raise LeaseLost(item.id)
        if settled:
            assert prepared is not None and bookings is not None
            await cost.settle(conn, item, day=prepared.billing_day, episode_id=episode_id,
                              bookings=bookings)
        if episode_id is not None and reason == "transient":
            await conn.execute(
                _Q["record_episode_error"],
                {"episode_id": episode_id, "error": f"attempt {item.attempt}: {error}"},
            )
    return deferral


async def write_release(
    conn: Connection, item: ClaimedItem, prepared: Prepared | None, *, called: bool,
    bookings: Sequence[Booking] | None,
) -> bool:
    """Hand an item back at shutdown (``queue.release_item``): before its call started, whole
    (attempt given back, nothing booked); after it, the attempt stays used and the spend is
    settled: ``bookings`` (what its calls owe) or, when None, the reservation booked whole as
    an estimate by the queue's trigger. False when the fence no longer holds."""
    settled = called and bookings is not None and prepared is not None
    async with as_org(conn, item.organization_id):
        held = await queue.release_item(conn, item, called=called, settled=settled)
        if held and settled:
            assert prepared is not None and bookings is not None
            await cost.settle(conn, item, day=prepared.billing_day,
                              episode_id=prepared.episode_id, bookings=bookings)
    return held


async def record_lost_attempts(conn: Connection, reaped: list[queue.ReapedItem]) -> None:
    """Add the reaper's verdict to each reaped item's episode history (inside a transaction
    that acts for each item's organisation in turn)."""
    for item in reaped:
        if item.episode_id is None:
            continue
        await act_for(conn, item.organization_id)
        await conn.execute(
            _Q["record_episode_error"],
            {"episode_id": item.episode_id, "error": f"attempt {item.attempt}: {item.error}"},
        )
