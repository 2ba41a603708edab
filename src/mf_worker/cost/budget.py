"""The hard daily cost limit per organisation: reserve before generating, trip, and recover.

Before a generation the worker reserves the item's worst-case cost (:func:`reserve`: granted,
limit reached or lease lost) on the organisation's row of ``token_usage_daily`` in one
conditional UPDATE (``spent + reserved + amount <= limit``): the row lock makes it atomic, so
N workers racing for one organisation cannot together start more than the budget allows (a free
attempt, worst case £0, reserves nothing: it only needs the day not to be over the limit
already). Releasing is the database's job: a trigger gives the reservation back whenever the
item leaves ``processing`` (see migration 0002), booked as an estimate unless the exit booked
the real usage (the final write; :func:`settle`). When the budget cannot cover an item, the
breaker blocks it and the organisation's other pending items without charging an attempt,
records the trip once per organisation and UTC day (user event, audit row,
notifications), and the budget loop (``maintenance.budget``, through
:func:`release_blocked_items`) releases the blocked items when the day turns (policy ``resume``
or ``skip``) or as soon as the limit is raised. Notifications are at least
once: the trip row records when they succeeded (``notified_at``), and the budget loop re-sends
a trip whose notification failed or was interrupted, with backoff, for the rest of its day.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final, Protocol

from psycopg import AsyncCursor
from psycopg.types.json import Jsonb

from .. import queue
from ..db import Connection, Pool, as_org
from ..db.sql import load_queries
from ..errors import LeaseLost, MfWorkerError, describe_error
from ..generation import (
    CallOutcome,
    GenerationRequest,
    Generator,
    ProviderCall,
    TokenUsage,
    estimate_max_usage,
)
from ..ids import new_id
from ..logs import get_logger
from ..queue import ClaimedItem
from .pricing import PriceTable

_Q = load_queries(__package__ or "mf_worker.cost", "budget.sql")

POLICIES = ("resume", "skip")

# How long a process that is sending a trip's notifications holds them before another process
# may send them again (the notifiers' own retries take well under a minute).
NOTIFY_LEASE_SECONDS: Final = 300.0
# How long an item refused only by reservations in flight waits before it tries again: long
# enough not to churn claims, short against a generation's minutes.
RESERVATION_WAIT_SECONDS: Final = 15.0


class CostLimitReached(MfWorkerError):
    """The organisation's remaining budget today cannot cover this item's worst case."""

    def __init__(self, organization_id: str, day: date, spent: Decimal, reserved: Decimal,
                 limit: Decimal, needed: Decimal) -> None:
        self.organization_id, self.day = organization_id, day
        self.spent, self.reserved, self.limit, self.needed = spent, reserved, limit, needed
        super().__init__(
            f"Daily limit exceeded: £{spent:.2f} spent (+£{reserved:.2f} reserved) of "
            f"£{limit:.2f} on {day.isoformat()} (UTC); the next episode may cost up to "
            f"£{needed:.2f}"
        )

    @property
    def by_reservations(self) -> bool:
        """Refused only because generations in flight hold reservations: the spend itself
        leaves room, and those reservations settle (often for less) when they finish."""
        return self.spent + self.needed <= self.limit


@dataclass(frozen=True, slots=True)
class Budget:
    """How the worker prices and reserves: the settings that govern the limit."""

    prices: PriceTable
    default_limit: Decimal
    reserve_per_item: Decimal

    def worst_case(self, generator: Generator, request: GenerationRequest) -> Decimal:
        """The generator's own upper bound priced by the table, else the flat reserve."""
        usage = estimate_max_usage(generator, request)
        return self.prices.cost(usage) if usage is not None else self.reserve_per_item


@dataclass(frozen=True, slots=True)
class Granted:
    """The attempt may run: its worst case is reserved on ``day`` (a free attempt reserves
    nothing; the day only had to be under the limit still)."""

    day: date  # the billing day (the database's UTC day): the attempt's usage is filed under it
    amount: Decimal  # what this attempt holds until it settles or its item leaves processing
    # The episode this claim's earlier run created (a prepare retried after its commit was
    # lost finds its own), else None: the episode is the caller's ``new_episode_id`` or older.
    episode_id: str | None = None


# What one reservation came to. The two refusals are exceptions so that a batch can hand each
# item its own outcome to raise (``engine.batching``), but :func:`reserve` returns them: a
# refusal is an answer, not a failure. ``CostLimitReached.by_reservations`` tells a refusal
# the reservations in flight caused (the item waits) from one by spend (the breaker trips).
Reservation = Granted | CostLimitReached | LeaseLost


@dataclass(frozen=True, slots=True)
class PendingReservation:
    """A reservation sent but not read yet: in a pipeline, a batch's reservations travel in
    one round trip and :meth:`result` reads each once the pipeline has synced."""

    _cursor: AsyncCursor[dict[str, Any]]
    _item: ClaimedItem
    _amount: Decimal
    _day: date | None

    async def result(self) -> Reservation:
        row = await self._cursor.fetchone()
        if row is not None and not row["held"]:
            return LeaseLost(self._item.id)
        if row is not None and row["reserved"]:
            return Granted(row["day"], self._amount, row["episode_id"])
        # Refused: the statement's spend and limit (as they were before it) explain it. No row
        # means the organisation is gone: nothing to spend, on the caller's day.
        spent, reserved, limit, day = (
            (row["spent_gbp"], row["reserved_gbp"], row["limit_gbp"], row["day"]) if row
            else (Decimal(0), Decimal(0), Decimal(0), self._day or datetime.now(UTC).date())
        )
        return CostLimitReached(self._item.organization_id, day, spent, reserved, limit,
                                self._amount)


async def reserve(
    conn: Connection, item: ClaimedItem, *, amount: Decimal, day: date | None,
    default_limit: Decimal, new_episode_id: str | None, sequence_number: int,
) -> PendingReservation:
    """Reserve ``amount`` (the attempt's worst case) on the organisation's aggregate for
    ``day`` (None: the database's UTC day) if the day's limit leaves room, fenced on the
    claim; granted, the amount is noted on the item (a trigger gives it back when the item
    leaves ``processing``) and, with ``new_episode_id``, the episode row is created
    (``generating``, number ``sequence_number``). A refusal writes nothing.

    Runs in the caller's transaction acting for the item's organisation; several may share it
    (``db.act_for`` switching the organisation between them, in organisation order so that
    batches take the aggregate rows' locks in the same order). Idempotent per claim: a claim
    that reserved before finds its reservation and reserves nothing more."""
    cursor = await conn.execute(_Q["reserve_budget"], {
        **queue.fence(item),
        "organization_id": item.organization_id, "project_id": item.project_id,
        "amount": amount, "date": day, "default_limit": default_limit,
        "new_episode_id": new_episode_id, "sequence_number": sequence_number,
    })
    return PendingReservation(cursor, item, amount, day)


def usage_rows(usages: Sequence[TokenUsage], costs: Sequence[Decimal]) -> Jsonb:
    """``token_usage`` rows for ``usages`` priced as ``costs`` (GBP each), as one JSON
    parameter (the final write and :func:`settle` unpack it with ``jsonb_to_recordset``)."""
    return booking_rows([Booking(cost, u) for u, cost in zip(usages, costs, strict=True)])


@dataclass(frozen=True, slots=True)
class Booking:
    """One ``token_usage`` row an attempt books: a call's real ``usage`` priced at ``cost``, or
    (``usage`` None) the worst case of a call whose fate is unknown, marked estimated; an
    estimate carries its cost only (model ``estimate``, no tokens), like the queue trigger's."""

    cost: Decimal
    usage: TokenUsage | None = None

    @property
    def estimated(self) -> bool:
        return self.usage is None


def booking_rows(bookings: Sequence[Booking]) -> Jsonb:
    """``token_usage`` rows for ``bookings``, as one JSON parameter."""
    return Jsonb([
        {"id": new_id("tok"), "model": b.usage.model if b.usage else "estimate",
         "prompt_tokens": b.usage.prompt_tokens if b.usage else 0,
         "completion_tokens": b.usage.completion_tokens if b.usage else 0,
         "cost_gbp": str(b.cost), "estimated": b.estimated}
        for b in bookings
    ])


def settlement(
    calls: Sequence[ProviderCall], *, reserved: Decimal, prices: PriceTable,
) -> tuple[Booking, ...]:
    """What an attempt books for the provider calls it made, whatever its outcome: each
    answered call's usage; nothing for a refused call; an unknown call's own worst case
    (``max_usage``), marked estimated, or, for a call that stated none, what is left of the
    attempt's ``reserved`` worst case after the rest (the reservation bounds the attempt's
    calls together). A zero estimate books nothing."""
    bookings: list[Booking] = []
    unbounded = False
    for call in calls:
        if call.outcome is CallOutcome.ANSWERED and call.usage is not None:
            bookings.append(Booking(prices.cost(call.usage), call.usage))
        elif call.outcome is CallOutcome.REFUSED:
            continue
        elif call.max_usage is not None:
            bookings.append(Booking(prices.cost(call.max_usage)))
        else:
            unbounded = True
    if unbounded:
        bookings.append(Booking(max(reserved - sum((b.cost for b in bookings), Decimal(0)),
                                    Decimal(0))))
    return tuple(b for b in bookings if not (b.estimated and b.cost <= 0))


async def settle(
    conn: Connection, item: ClaimedItem, *, day: date | None, episode_id: str | None,
    bookings: Sequence[Booking] | None = None, usages: Sequence[TokenUsage] = (),
    costs: Sequence[Decimal] = (),
) -> None:
    """Book what an attempt that did not succeed is known to owe (:func:`settlement`: answered
    calls' usage, estimates for unknown calls) on its reservation's ``day``; or, without
    ``bookings``, ``usages`` priced as ``costs``. Runs in the caller's transaction acting for
    the item's organisation, beside the fenced queue transition that clears the reservation
    without booking it as an estimate (its ``settled``)."""
    if bookings is None:
        bookings = [Booking(c, u) for u, c in zip(usages, costs, strict=True)]
    if not bookings:
        return
    await conn.execute(_Q["book_attempt_usage"], {
        "organization_id": item.organization_id, "project_id": item.project_id,
        "episode_id": episode_id, "billing_date": day, "usages": booking_rows(bookings),
    })


@dataclass(frozen=True, slots=True)
class Trip:
    """A cost-limit trip, as the notifier receives it."""

    organization_id: str
    date: date
    spent_gbp: Decimal
    limit_gbp: Decimal
    blocked_items: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "cost_limit_reached",
            "organization_id": self.organization_id,
            "date": self.date.isoformat(),
            "spent_gbp": str(self.spent_gbp),
            "limit_gbp": str(self.limit_gbp),
            "blocked_items": self.blocked_items,
            "message": self.message,
        }


async def trip_breaker(
    conn: Connection, item: ClaimedItem, reached: CostLimitReached
) -> Trip | None:
    """Block the item (no attempt charged) and the organisation's pending items; record the
    trip. Returns the Trip when this call was the day's first (the caller then notifies).

    A refusal caused only by reservations in flight is not a trip: the item waits
    (:data:`RESERVATION_WAIT_SECONDS`, no attempt charged) and nothing else is blocked or
    notified, so the day's one notification is kept for a day whose spend is really used up."""
    org, day = item.organization_id, reached.day
    async with as_org(conn, org):
        if reached.by_reservations:
            await queue.release_item(conn, item, delay_seconds=RESERVATION_WAIT_SECONDS,
                                     error=str(reached))
            return None
        await queue.release_item(conn, item, status="blocked",
                                 error=str(reached), blocked_on=day)
        cur = await conn.execute(
            _Q["block_org_pending_items"],
            {"organization_id": org, "date": day, "reason": str(reached)},
        )
        blocked = 1 + len(await cur.fetchall())
        cur = await conn.execute(
            _Q["record_trip"],
            {"organization_id": org, "date": day, "spent_gbp": reached.spent,
             "limit_gbp": reached.limit, "needed_gbp": reached.needed,
             "lease_seconds": NOTIFY_LEASE_SECONDS},
        )
        if await cur.fetchone() is None:
            return None
        trip = Trip(org, day, reached.spent, reached.limit, blocked, str(reached))
        await conn.execute(
            _Q["insert_trip_event"],
            {"id": new_id("evt"), "organization_id": org,
             "data": json.dumps(trip.to_json())},
        )
        await conn.execute(
            _Q["insert_trip_audit"],
            {"id": new_id("aud"), "organization_id": org, "detail": json.dumps(trip.to_json())},
        )
    return trip


class TripNotifier(Protocol):
    async def notify(self, trip: Trip) -> None:
        """Deliver one trip; raise to signal failure."""


async def mark_notified(conn: Connection, trip: Trip) -> None:
    async with as_org(conn, trip.organization_id):
        await conn.execute(_Q["mark_trip_notified"],
                           {"organization_id": trip.organization_id, "date": trip.date})


async def record_notify_failure(conn: Connection, trip: Trip, error: str) -> None:
    """The trip stays un-notified; its next attempt is backed off."""
    async with as_org(conn, trip.organization_id):
        await conn.execute(_Q["record_trip_notify_failure"], {
            "organization_id": trip.organization_id, "date": trip.date, "error": error[:2000]})


async def deliver_trip(pool: Pool, notifier: TripNotifier, trip: Trip,
                       on_notified: Callable[[bool], None] | None = None) -> bool:
    """Notify; record the success, or the failure for a later retry. True when delivered
    (also passed to ``on_notified``, the metrics' subscription). Never raises: if even the
    record cannot be written, the sending lease runs out and the budget loop sends the trip
    again (at least once)."""
    log = get_logger("mf_worker.notify")
    error: str | None = None
    try:
        await notifier.notify(trip)
    except Exception as exc:  # the items are blocked either way; say so loudly
        error = describe_error(exc)
        log.error("notification_failed", error=error, organization_id=trip.organization_id,
                  date=trip.date.isoformat())
    try:
        async with pool.connection() as conn:
            if error is None:
                await mark_notified(conn, trip)
            else:
                await record_notify_failure(conn, trip, error)
    except Exception as exc:
        log.error("notification_record_failed", error=describe_error(exc),
                  organization_id=trip.organization_id, delivered=error is None)
    if on_notified is not None:
        on_notified(error is None)
    return error is None


async def list_blocked_orgs(
    conn: Connection, *, day: date, default_limit: Decimal
) -> list[dict[str, Any]]:
    """Organisations with cost-blocked items, with the day's spend, reservations and limit."""
    cur = await conn.execute(_Q["list_cost_blocked_orgs"],
                             {"date": day, "default_limit": default_limit})
    return list(await cur.fetchall())


@dataclass(frozen=True, slots=True)
class Released:
    """What :func:`release_blocked_items` did: items resumed (pending again) and skipped."""

    resumed: int = 0
    skipped: int = 0


async def release_blocked_items(
    pool: Pool, *, now: datetime, policy: str, default_limit: Decimal, reserve_per_item: Decimal,
) -> Released:
    """Release cost-blocked items at ``now``: at the next UTC day by ``policy`` (``resume`` or
    ``skip``), or the same day once the worst case the trip refused fits (the limit was
    raised). Returns how many items were resumed and skipped. The budget loop
    (``maintenance.budget``) runs this every pass."""
    log = get_logger("mf_worker.budget")
    today = now.astimezone(UTC).date()
    resumed_total = skipped_total = 0
    async with pool.connection() as conn:
        blocked = await list_blocked_orgs(conn, day=today, default_limit=default_limit)
        for org in blocked:
            params = {"organization_id": org["organization_id"], "date": today, "now": now}
            new_day = org["blocked_on"] < today
            # The worst case today's trip refused must fit, not a flat reserve: otherwise
            # the items resume, are claimed, refused and blocked again every pass.
            needed = org["needed_gbp"] if org["needed_gbp"] is not None else reserve_per_item
            room = org["spent_gbp"] + org["reserved_gbp"] + needed <= org["limit_gbp"]
            async with as_org(conn, org["organization_id"]):
                if new_day and policy == "skip":
                    skipped = await (await conn.execute(_Q["skip_blocked_items"], params))\
                        .fetchall()
                    skipped_total += len(skipped)
                    log.info("cost_block_skipped", organization_id=params[
                        "organization_id"], items=len(skipped))
                if new_day or room:
                    resumed = await (await conn.execute(_Q["resume_blocked_items"], params))\
                        .fetchall()
                    resumed_total += len(resumed)
                    log.info("cost_block_lifted", organization_id=params[
                        "organization_id"], items=len(resumed),
                        reason="new day" if new_day else "limit raised")
    return Released(resumed=resumed_total, skipped=skipped_total)


async def resend_notifications(
    pool: Pool, notifier: TripNotifier, *, now: datetime,
    on_notified: Callable[[bool], None] | None = None,
) -> int:
    """Send again today's trips whose notification failed or was interrupted and whose next
    attempt is due at ``now``; each is claimed first, so two processes never send one at once.
    Returns how many were delivered."""
    log = get_logger("mf_worker.budget")
    today, sent = now.astimezone(UTC).date(), 0
    async with pool.connection() as conn:
        cur = await conn.execute(_Q["list_trips_to_notify"], {"date": today, "now": now})
        due = await cur.fetchall()
    for row in due:
        params = {"organization_id": row["organization_id"], "date": row["date"],
                  "now": now, "lease_seconds": NOTIFY_LEASE_SECONDS}
        async with pool.connection() as conn, as_org(conn, row["organization_id"]):
            claimed = await (await conn.execute(_Q["claim_trip_notification"], params))\
                .fetchone()
        if claimed is None:
            continue
        trip = Trip(
            row["organization_id"], row["date"], row["spent_gbp"], row["limit_gbp"],
            row["blocked_items"],
            f"Daily limit exceeded: £{row['spent_gbp']:.2f} spent of "
            f"£{row['limit_gbp']:.2f} on {row['date'].isoformat()} (UTC)",
        )
        log.info("notification_retried", organization_id=trip.organization_id)
        sent += await deliver_trip(pool, notifier, trip, on_notified)
    return sent
