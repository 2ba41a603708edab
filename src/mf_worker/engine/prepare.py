"""Preparing claimed items for generation: a batch per transaction.

``prepare_generations`` loads each item's context (``context``), reserves its worst-case cost
(``cost.reserve``) and makes sure its episode row exists (from the first attempt, so its
history survives retries). It sends the whole batch in one pipelined transaction that acts for
each item's organisation in turn (row-level security rejects a row of any other organisation),
in organisation order (:func:`org_order`, which the final write shares) so that batches of
different workers take the aggregate rows' locks in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from .. import cost
from ..cost import CostLimitReached
from ..db import Connection, act_for
from ..errors import InvalidItemError, LeaseLost
from ..generation import GenerationRequest
from ..ids import new_id
from ..queue import ClaimedItem
from ..scheduling.cadence import CadenceError, zone_for
from .context import build_request, query_generation_context


class ItemUnavailable(InvalidItemError):
    """The item's project was deleted, paused or archived: the item is cancelled, not failed."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything the final write needs besides the generator's result."""

    request: GenerationRequest
    episode_id: str
    new_episode: bool  # no earlier attempt (nor an earlier run of this prepare) created it
    user_id: str
    cadence_config: Any
    delivery_time: time
    timezone: str
    # The UTC day the reservation was taken (the database's clock): the attempt's usage is
    # filed under it, whenever it is written. Set by the reservation.
    billing_day: date | None = None
    reserved_gbp: Decimal = Decimal(0)  # the worst case reserved for this attempt


# What one item of a batch came to: a value, or the exception that explains why not.
PrepareOutcome = Prepared | ItemUnavailable | InvalidItemError | CostLimitReached | LeaseLost


def org_order(items: Sequence[ClaimedItem]) -> list[int]:
    """Indexes of ``items`` by organisation: one setting per organisation, and the same lock
    order on the aggregate rows in every batch of every worker (no deadlock between them)."""
    return sorted(range(len(items)), key=lambda i: (items[i].organization_id, items[i].id))


async def prepare_generations(
    conn: Connection,
    items: Sequence[ClaimedItem],
    *,
    now: datetime | None,
    worst_case: Callable[[GenerationRequest], Decimal],
    default_limit: Decimal,
) -> list[PrepareOutcome]:
    """Prepare a batch of claimed items in one transaction and two round trips: load every
    context, then reserve every item's worst-case cost (creating its episode at the first
    attempt). One outcome per item, in order: Prepared, or ItemUnavailable (cancel it),
    InvalidItemError (fail it), CostLimitReached (block it; nothing was written for it) or
    LeaseLost. A database error raises for the whole batch, which then wrote nothing.
    Idempotent per claim: run again for the same claims (after a commit whose acknowledgement
    was lost), it finds their reservations and episodes instead of adding new ones. The
    billing day is the database's UTC day (``now`` given: that instant's, for tests).
    """
    outcomes: list[PrepareOutcome | None] = [None] * len(items)
    loads: dict[int, Any] = {}
    reservations: dict[int, tuple[Prepared, cost.PendingReservation]] = {}
    day = now.astimezone(UTC).date() if now is not None else None
    async with conn.pipeline() as pipeline, conn.transaction():
        acting: str | None = None
        for i in org_order(items):
            item = items[i]
            if item.project_id is None:
                outcomes[i] = ItemUnavailable("project deleted")
                continue
            if item.organization_id != acting:
                acting = item.organization_id
                await act_for(conn, acting)
            loads[i] = await query_generation_context(
                conn, item.project_id, item.episode_id, queue_id=item.id)
        await pipeline.sync()
        acting = None
        for i, cursor in loads.items():  # in org order, as inserted
            item = items[i]
            try:
                prepared = _prepared(item, await cursor.fetchone())
            except InvalidItemError as exc:  # ItemUnavailable too
                outcomes[i] = exc
                continue
            if item.organization_id != acting:
                acting = item.organization_id
                await act_for(conn, acting)
            reservations[i] = (prepared, await cost.reserve(
                conn, item, amount=worst_case(prepared.request), day=day,
                default_limit=default_limit,
                new_episode_id=prepared.episode_id if prepared.new_episode else None,
                sequence_number=prepared.request.episode_number,
            ))
    for i, (prepared, pending) in reservations.items():
        reservation = await pending.result()
        if not isinstance(reservation, cost.Granted):
            outcomes[i] = reservation
            continue
        if reservation.episode_id is not None:  # this claim's earlier run made the episode
            prepared = replace(prepared, episode_id=reservation.episode_id, new_episode=False)
        outcomes[i] = replace(prepared, billing_day=reservation.day,
                              reserved_gbp=reservation.amount)
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def _prepared(item: ClaimedItem, project: dict[str, Any] | None) -> Prepared:
    """The request for ``item`` from its loaded context (raises ItemUnavailable when the
    project is gone or inactive, InvalidItemError when its owner's zone is unknown)."""
    if project is None:
        raise ItemUnavailable("project deleted")
    if project["status"] != "active":
        raise ItemUnavailable(f"project {project['status']}")
    try:
        zone = zone_for(project["timezone"])
    except CadenceError as exc:
        raise InvalidItemError(f"project {item.project_id}: owner's {exc}") from None
    existing = project["existing_episode"]
    number = existing["sequence_number"] if existing else project["last_sequence_number"] + 1
    return Prepared(
        request=build_request(item, project, zone, number),
        episode_id=existing["id"] if existing else new_id("ep"),
        new_episode=existing is None,
        user_id=project["user_id"],
        cadence_config=project["cadence_config"],
        delivery_time=project["delivery_time"],
        timezone=project["timezone"],
    )
