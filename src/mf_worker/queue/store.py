"""Queue transitions as plain async functions; each is one statement, fenced where it matters.

Every claim carries a claim token that never repeats (a sequence value drawn by the claim), and
every later transition of that claim matches ``(id, token)`` while the item is processing: the
fence. Functions that change one claimed item return whether the fence still held, so the caller
learns that it lost the claim instead of silently writing over someone else's work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from ..db import Connection
from ..db.sql import load_queries

_Q = load_queries(__package__ or "mf_worker.queue", "queries.sql")


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    """A queue item this worker holds: the fence is (id, token). ``attempt`` counts generator
    calls (the attempt budget); ``token`` is this claim's and no other's."""

    id: str
    token: int
    project_id: str | None
    organization_id: str
    scheduled_for: datetime
    run_after: datetime
    attempt: int
    episode_id: str | None
    metadata: dict[str, Any]
    lease_expires_at: datetime
    # Why the item was last put back (``transient``, ``rate_limited``, ``quota_exhausted``),
    # if ever: a last attempt that failed transiently may move it to the fallback generator.
    deferred_reason: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClaimedItem:
        return cls(
            id=row["id"],
            token=row["claim_token"],
            project_id=row["project_id"],
            organization_id=row["organization_id"],
            scheduled_for=row["scheduled_for"],
            run_after=row["run_after"],
            attempt=row["attempt_count"],
            episode_id=row["episode_id"],
            metadata=row["metadata"],
            lease_expires_at=row["lease_expires_at"],
            deferred_reason=row.get("deferred_reason"),
        )


@dataclass(frozen=True, slots=True)
class ReapedItem:
    """An item whose lease expired and which the reaper returned (or failed)."""

    id: str
    organization_id: str
    episode_id: str | None
    status: str
    attempt: int
    error: str


# A claim looks at up to CLAIM_ORGS_PER_ITEM × limit organisations with a due item (the fair
# ordering's candidates; more would only cost index descents per claim). It reads the earliest
# DUE_PREFIX_PER_ITEM × limit due items: when those are all the due items, their organisations
# are every due one. Otherwise (a backlog) it walks the organisations in id order from where
# the previous claim stopped, up to WALK_STEPS_PER_ITEM × limit of them; while the backlog
# lasts the walk goes first, and the first look only tops up a walk that came back short.
# The walk chooses whose fair turn comes; items past their delivery instant do not wait for
# it: the claim statement itself adds the earliest of them, whatever their organisation.
CLAIM_ORGS_PER_ITEM = 4
DUE_PREFIX_PER_ITEM = 32
WALK_STEPS_PER_ITEM = 64


@dataclass(slots=True)
class OrganizationRotation:
    """Where one process's claims stopped among the organisations with due items, so the next
    claim goes on after it: when more organisations are due than one claim looks at, they take
    turns, and none waits longer than a round of claims for its turn, however many there are.
    Each process keeps its own (no shared row to contend on). ``backlog``: the last claim found
    more due items than its first look reads, so the next one walks first."""

    after: str = ""
    backlog: bool = False


async def _due_organizations(
    conn: Connection, *, limit: int, rotation: OrganizationRotation, now: datetime | None,
) -> list[str]:
    """The organisations the next claim chooses among: at most ``CLAIM_ORGS_PER_ITEM × limit``
    with a due item, those after ``rotation.after`` first (wrapping round); moves the rotation
    on to the last one this claim looked at.

    Few due items (the earliest ``DUE_PREFIX_PER_ITEM × limit`` are all of them): their
    organisations, in turn. A backlog: the walk's, topped up with the organisations of the
    earliest due items, so a claim never comes back empty while items are due (the walk may
    not reach the one busy organisation among many idle ones within its steps)."""
    want = CLAIM_ORGS_PER_ITEM * limit
    walked: list[str] = []
    if rotation.backlog:
        walked, whole = await _walk_due_organizations(conn, want=want, limit=limit,
                                                      rotation=rotation, now=now)
        if len(walked) >= want or (whole and walked):
            return walked
    first = await (await conn.execute(
        _Q["list_due_organizations"], {"scan": DUE_PREFIX_PER_ITEM * limit, "now": now},
    )).fetchone()
    earliest: list[str] = sorted(first["organizations"]) if first else []
    if first is None or first["complete"]:
        rotation.backlog = False
        if len(earliest) <= want:
            return earliest
        turn = ([o for o in earliest if o > rotation.after]
                + [o for o in earliest if o <= rotation.after])[:want]
        rotation.after = turn[-1]
        return turn
    if not rotation.backlog:
        rotation.backlog = True
        walked, whole = await _walk_due_organizations(conn, want=want, limit=limit,
                                                      rotation=rotation, now=now)
    return (walked + [o for o in earliest if o not in walked])[:want]


async def _walk_due_organizations(
    conn: Connection, *, want: int, limit: int, rotation: OrganizationRotation,
    now: datetime | None,
) -> tuple[list[str], bool]:
    """Up to ``want`` organisations with a due item, walking round from ``rotation.after``
    (``WALK_STEPS_PER_ITEM × limit`` organisations looked at, at most); and whether the walk
    went all the way round (so it found every due organisation)."""
    rows = await (await conn.execute(_Q["walk_due_organizations"], {
        "after": rotation.after, "want": want, "steps": WALK_STEPS_PER_ITEM * limit, "now": now,
    })).fetchall()
    if not rows:
        return [], True  # no organisation has a pending item
    rotation.after = rows[-1]["organization_id"]
    return [r["organization_id"] for r in rows if r["due"]], bool(rows[-1]["round"])


async def claim_due_items(
    conn: Connection, *, worker: str, limit: int, lease_seconds: float,
    now: datetime | None = None, org_max_in_flight: int | None = None,
    rotation: OrganizationRotation | None = None,
) -> list[ClaimedItem]:
    """Claim up to ``limit`` due pending items for ``worker``: items whose delivery instant has
    come first (the earliest deadlines of the whole queue, whichever organisations the
    rotation chose), then fairly across organisations (each one's earliest before anyone's
    second, and organisations taking turns when more are due than a claim looks at: pass the
    same ``rotation`` to every claim of a process), then earliest delivery instant; with at
    most ``org_max_in_flight`` of one organisation's items processing (None: no cap). The
    claim itself is one short transaction; the organisations are read just before it."""
    organizations = await _due_organizations(
        conn, limit=limit, rotation=rotation or OrganizationRotation(), now=now)
    if not organizations:
        return []
    cur = await conn.execute(
        _Q["claim_due_items"],
        {"worker": worker, "limit": limit, "lease_seconds": lease_seconds, "now": now,
         "org_max_in_flight": org_max_in_flight, "organizations": organizations},
    )
    return [ClaimedItem.from_row(r) for r in await cur.fetchall()]


async def claim_item_by_id(
    conn: Connection, item_id: str, *, worker: str, lease_seconds: float,
    now: datetime | None = None,
) -> ClaimedItem | None:
    """Claim one pending item by id, due or not (for ``run-once --id``)."""
    cur = await conn.execute(
        _Q["claim_item_by_id"],
        {"id": item_id, "worker": worker, "lease_seconds": lease_seconds, "now": now},
    )
    row = await cur.fetchone()
    return ClaimedItem.from_row(row) if row else None


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """What one heartbeat found: the claims still held (``renewed`` or, locked by someone else
    this time, ``skipped``) — any other claim it asked about is lost."""

    renewed: set[int]
    skipped: set[int]

    @property
    def held(self) -> set[int]:
        return self.renewed | self.skipped


async def extend_leases(
    conn: Connection, items: Sequence[ClaimedItem], *, lease_seconds: float,
    now: datetime | None = None,
) -> LeaseRenewal:
    """Heartbeat: extend the leases of the claims still held, skipping rows someone else has
    locked (they stay held and are renewed next time)."""
    if not items:
        return LeaseRenewal(set(), set())
    cur = await conn.execute(
        _Q["extend_leases"],
        {
            "ids": [i.id for i in items],
            "tokens": [i.token for i in items],
            "lease_seconds": lease_seconds,
            "now": now,
        },
    )
    rows = await cur.fetchall()
    return LeaseRenewal(renewed={r["claim_token"] for r in rows if r["extended"]},
                        skipped={r["claim_token"] for r in rows if not r["extended"]})


async def complete_items(
    conn: Connection, items: Sequence[ClaimedItem], *, now: datetime | None = None
) -> set[str]:
    """Fenced completion of a batch; returns the ids that completed (others lost the lease)."""
    if not items:
        return set()
    cur = await conn.execute(
        _Q["complete_items"],
        {"ids": [i.id for i in items], "tokens": [i.token for i in items], "now": now},
    )
    return {r["id"] for r in await cur.fetchall()}


def fence(item: ClaimedItem) -> dict[str, Any]:
    """The parameters every fenced statement matches a claim by (``id``, ``token``): the queue's
    own statements, the final write and the budget reservation alike."""
    return {"id": item.id, "token": item.token}


async def _fenced(conn: Connection, query: str, params: dict[str, Any]) -> bool:
    cur = await conn.execute(_Q[query], params)
    return await cur.fetchone() is not None


async def retry_item(
    conn: Connection, item: ClaimedItem, *, delay_seconds: float, error: str,
    settled: bool = False, now: datetime | None = None,
) -> bool:
    """Back to pending after ``delay_seconds``; False if the fence no longer holds.
    ``settled``: the caller booked the attempt's real usage (else a reservation is booked as
    an estimate)."""
    return await _fenced(
        conn, "retry_item",
        {**fence(item), "now": now, "delay_seconds": delay_seconds, "error": error,
         "settled": settled},
    )


async def finish_item(
    conn: Connection, item: ClaimedItem, *, status: str, error: str, settled: bool = False,
    now: datetime | None = None,
) -> bool:
    """Final 'failed' or 'cancelled' with the reason; False if the fence no longer holds."""
    if status not in ("failed", "cancelled"):
        raise ValueError(f"finish_item: status must be failed or cancelled, not {status!r}")
    return await _fenced(
        conn, "finish_item",
        {**fence(item), "now": now, "status": status, "error": error, "settled": settled}
    )


async def release_item(
    conn: Connection, item: ClaimedItem, *, status: str = "pending", called: bool = False,
    delay_seconds: float = 0.0, error: str | None = None, blocked_on: date | None = None,
    settled: bool = False, now: datetime | None = None,
) -> bool:
    """Hand the item back: ``pending`` (shutdown; after ``delay_seconds``) or ``blocked`` by the
    cost breaker on ``blocked_on``. Before the generator call started (``called`` false) the
    attempt is given back and the reservation released; after it, the attempt stays used and
    the reservation is booked as an estimate (the call may have been billed), unless
    ``settled``: the caller books what the attempt's calls owe in this transaction."""
    if status not in ("pending", "blocked"):
        raise ValueError(f"release_item: status must be pending or blocked, not {status!r}")
    return await _fenced(
        conn, "release_item",
        {**fence(item), "now": now, "status": status, "error": error, "called": called,
         "settled": settled, "delay_seconds": delay_seconds,
         "blocked_on": blocked_on if status == "blocked" else None},
    )


async def cancel_item_by_operator(
    conn: Connection, item_id: str, *, reason: str
) -> dict[str, Any] | None:
    """``mf-worker cancel``: cancel a pending, blocked or processing item (a generation in
    flight is fenced out). Returns the item's id, organisation and episode, or None when it
    is in no state to cancel."""
    cur = await conn.execute(_Q["cancel_item_by_operator"], {"id": item_id, "reason": reason})
    row: dict[str, Any] | None = await cur.fetchone()
    return row


@dataclass(frozen=True, slots=True)
class Deferral:
    """What `defer_item` did: ``pending`` again after ``delay_seconds``, or ``failed``."""

    status: str
    delay_seconds: float
    retry_count: int
    error: str  # as stored in last_error


async def defer_item(
    conn: Connection, item: ClaimedItem, *, reason: str, error: str,
    retry_after: float | None = None, deadline_seconds: float = 0.0,
    not_after: datetime | None = None, backoff: tuple[float, float, float] = (1.0, 300.0, 1.0),
    settled: bool = False, now: datetime | None = None,
) -> Deferral | None:
    """Put the item back without using up its attempt: ``reason`` is ``rate_limited`` or
    ``quota_exhausted`` (after ``retry_after``), or ``transient`` (after the backoff, unless
    that comes after ``deadline_seconds`` from the first pick-up or after ``not_after``: then
    it fails). ``backoff`` is (base, cap, jitter factor). ``settled``: the caller books a
    transient failure's real usage in this transaction (else its reservation is booked as an
    estimate). None if the fence no longer holds."""
    if reason not in ("rate_limited", "quota_exhausted", "transient"):
        raise ValueError(f"defer_item: unknown reason {reason!r}")
    base, cap, jitter = backoff
    cur = await conn.execute(_Q["defer_item"], {
        **fence(item), "now": now, "reason": reason, "error": error,
        "retry_after": retry_after, "deadline_seconds": deadline_seconds,
        "not_after": not_after, "base_seconds": base, "cap_seconds": cap, "jitter": jitter,
        "settled": settled,
    })
    row = await cur.fetchone()
    if row is None:
        return None
    return Deferral(status=row["status"], delay_seconds=float(row["delay_seconds"]),
                    retry_count=row["retry_count"], error=row["last_error"])


async def reap_expired_leases(
    conn: Connection, *, max_attempts: int, limit: int = 500, now: datetime | None = None
) -> list[ReapedItem]:
    """Return expired-lease items to pending (or failed when out of attempts)."""
    cur = await conn.execute(
        _Q["reap_expired_leases"], {"max_attempts": max_attempts, "limit": limit, "now": now}
    )
    return [
        ReapedItem(
            id=r["id"], organization_id=r["organization_id"], episode_id=r["episode_id"],
            status=r["status"], attempt=r["attempt_count"], error=r["last_error"],
        )
        for r in await cur.fetchall()
    ]


async def prune_finished_items(
    conn: Connection, *, retention_days: int, limit: int = 500, now: datetime | None = None
) -> int:
    """Delete up to ``limit`` completed/cancelled items older than the retention."""
    cur = await conn.execute(
        _Q["prune_finished_items"],
        {"retention_days": retention_days, "limit": limit, "now": now},
    )
    return cur.rowcount


@dataclass(frozen=True, slots=True)
class DueState:
    """What an idle worker reads after a short claim (`read_due_state`)."""

    due_in_seconds: float | None  # until the earliest pending item is due (<= 0: due now)
    claimable: bool  # some due item's organisation is below MF_ORG_MAX_IN_FLIGHT


async def read_due_state(
    conn: Connection, *, org_max_in_flight: int | None = None, now: datetime | None = None,
) -> DueState:
    """When the earliest pending item becomes due (by the database's clock, like the claim),
    and whether a due item is one a claim may take now (its organisation below
    ``org_max_in_flight`` items processing; None: no cap)."""
    cur = await conn.execute(_Q["read_due_state"],
                             {"org_max_in_flight": org_max_in_flight, "now": now})
    row = await cur.fetchone()
    assert row is not None
    return DueState(due_in_seconds=row["due_in_seconds"], claimable=bool(row["claimable"]))


async def get_item(conn: Connection, item_id: str) -> dict[str, Any] | None:
    """One queue item's row (every column), or None."""
    row: dict[str, Any] | None = await (
        await conn.execute(_Q["get_item"], {"id": item_id})
    ).fetchone()
    return row
