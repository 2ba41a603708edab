"""The worker: claim due items, run the generator with no database resources held, write once.

One claim loop fills up to ``concurrency`` slots with batched claims and sleeps until a
notification, a freed slot, the next due time or the poll interval. Each claimed item runs as
its own task: prepare → generate (no connection, no lock, no transaction) → validate → write
the outcome (fenced). Prepares and successful writes go through a :class:`Batcher` each, so
items that reach the step together share one transaction (group commit); failures, cancels
and cost blocks are rare and are written one by one. The heartbeat keeps the leases of the
items in flight; when one is lost, the generation is abandoned because its write would be
refused anyway.

Every provider call an attempt makes goes through the request's call ledger
(``request.calls``): flow control admits it (the claim's request for the first call, one more
request and its tokens for each further call, a repair included), and whatever the attempt's
outcome — success, failure, deferral, hand-back — the attempt books what its calls owe
(``cost.settlement``): each answered call's usage, nothing for a call the provider refused, the
worst case of a call whose fate is unknown, marked estimated. A generator that reports no
calls is one implied call: its result's or error's usage, nothing for a rate limit, an
exhausted quota or a refused connection, else the whole reservation as an estimate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dt_time
from decimal import Decimal
from functools import partial
from typing import TypeVar

import psycopg
from psycopg_pool import PoolTimeout
from tenacity import (
    AsyncRetrying,
    retry_base,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
)

from .. import queue
from ..backoff import ITEM_RETRY, Backoff
from ..cost import Booking, Budget, CostLimitReached, deliver_trip, settlement, trip_breaker
from ..cost.notify import LogNotifier, Notifier, ProviderPaused, notify_provider_paused
from ..db import Connection, Pool
from ..errors import InvalidItemError, LeaseLost, describe_error
from ..flow import FlowControl, KeyCoolingDown, Limits
from ..generation import (
    CallLedger,
    CallOutcome,
    CallsPaused,
    GenerationRequest,
    GenerationResult,
    Generator,
    InvalidOutputError,
    PermanentGenerationError,
    ProviderCall,
    QuotaExhaustedError,
    RateLimitedError,
    RetryableGenerationError,
    TokenUsage,
    estimate_max_usage,
    limit_key_of,
    validate_result,
)
from ..logs import bind_item, get_logger
from ..queue import ClaimedItem
from ..scheduling.cadence import next_occurrence
from ..settings import Settings
from .batching import Batcher
from .events import ClaimLoopTicked, EventHub, ItemMovedToFallback, ItemsClaimed, TripNotified
from .failures import cancel_item, write_deferral, write_failure, write_release
from .prepare import ItemUnavailable, Prepared, PrepareOutcome, prepare_generations
from .write import Delivery, EpisodeWrite, WriteOutcome, write_episodes

T = TypeVar("T")

# Errors worth retrying on the database side: a dropped connection, a restart, a failover, a
# deadlock or serialisation failure (psycopg files those under OperationalError too), and a
# lock, statement or idle-in-transaction timeout (MF_DB_LOCK_TIMEOUT, MF_DB_STATEMENT_TIMEOUT;
# the last one is an InternalError to psycopg, raised when a unit stalled mid-transaction).
# A read-only server (SQLSTATE 25006) is a failover in progress: a standby reached before its
# promotion (a DNS name or load balancer that flipped early, a multi-host URL without
# target_session_attrs=read-write). The pool discards the connection that met it (mf_worker.db),
# and the unit is retried on a fresh one, which reaches the promoted server.
TRANSIENT_DB_ERRORS = (psycopg.OperationalError, PoolTimeout,
                       psycopg.errors.IdleInTransactionSessionTimeout,
                       psycopg.errors.ReadOnlySqlTransaction)
# What a failed claim may raise without ending the daemon: any database error at all (a
# transient one above, or one that retrying may not fix, such as a permission revoked by
# mistake, which an operator can fix while the worker keeps trying and says so).
CLAIM_ERRORS = (psycopg.Error, PoolTimeout)
# The timeouts among them that concern one item's rows (someone holds its lock), not the
# database as a whole: a batch that meets one is split, not retried whole.
ITEM_DB_ERRORS = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)
MAX_ERROR_CHARS = 2000
# Most items one prepare or final-write transaction takes: bounds how long a batch holds its
# row locks, and what one failing item costs (a failed batch is retried item by item).
MAX_BATCH = 32
# Transactions of each kind in flight at once: while one waits for PostgreSQL, the next batch
# gathers and goes on another connection (two cores' worth of database work; more did not
# help on two cores).
FLUSHES = 2
# A wave of waiting items is split between the free flushers (lower latency), but not into
# batches smaller than this (each batch costs a transaction: more CPU per item).
MIN_SHARE = 4
# A claim takes at most half the concurrency, and at most MAX_CLAIM items: items claimed
# together move through prepare and write together, so two or more waves keep the database
# busy while Python works on another, and a wave's transactions stay short (item latency).
CLAIM_SHARE = 2
MAX_CLAIM = 16
# A unit of database work retried while the database is away (a restart, a failover): about
# 0.2 s · 2^n plus up to a second of jitter, at most 5 s apart, for up to one lease.
DB_RETRY = Backoff(initial=0.2, factor=2.0, cap=5.0, jitter_seconds=1.0)
# With a fallback generator: after a call to the generator failed transiently, items due soon
# go to the fallback without calling it for this long; then one such item tries it again (a
# success sends the next items back to it). Items with time to spare always try it.
PRIMARY_PROBE_SECONDS = 30.0
# Why an item moves to the fallback: the primary's key is held (the limiter's cooldown
# reasons), or its calls fail transiently.
FALLBACK_REASONS = ("rate_limited", "quota_exhausted", "transient")


class Role(enum.StrEnum):
    """Which generator wrote an episode (the ``generator`` label of the episodes metric)."""

    PRIMARY = "primary"
    FALLBACK = "fallback"


class Outcome(enum.StrEnum):
    """How one attempt at one item ended (the ``outcome`` label of the attempts metric)."""

    SUCCESS = "success"
    RETRY = "retry"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"
    DEFERRED = "deferred"  # back to pending, no attempt used: reservations, rate limit, quota
    LEASE_LOST = "lease_lost"
    RELEASED = "released"


class Starvation(enum.StrEnum):
    """Why the claim loop has room but claims nothing it should (the ``reason`` label of
    ``mf_worker_claim_starved_seconds``; /healthz names it)."""

    CLAIM_FAILING = "claim_failing"  # the claim statement fails (database away, read-only, locks)
    CLAIMS_EMPTY = "claims_empty"  # claims come back empty while items it may take are due
    FLOW_BLOCKED = "flow_blocked"  # flow control admits no claim while this process holds none


class FailureReason(enum.StrEnum):
    """Why an attempt failed (the ``reason`` label of the failures metric)."""

    GENERATOR_RETRYABLE = "generator_retryable"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    GENERATOR_PERMANENT = "generator_permanent"
    INVALID_OUTPUT = "invalid_output"
    TIMEOUT = "timeout"
    DATABASE = "database"
    LOST_WORKER = "lost_worker"
    INVALID_ITEM = "invalid_item"


@dataclass
class InFlight:
    """An item this process holds, and what its task is doing."""

    item: ClaimedItem
    task: asyncio.Task[Outcome] | None = None
    phase: str = "preparing"  # preparing → generating → writing
    lost: bool = False
    admitted: bool = False  # the claim loop took a request for it (its first call's)
    flow_settled: bool = False  # that request was used by a call, or handed back
    prepared: Prepared | None = None
    role: Role = Role.PRIMARY  # which generator the attempt uses (decided before preparing)
    calls: CallLedger | None = None  # the attempt's provider calls
    first_charge: int = 0  # tokens flow control took before the first call
    bookings: tuple[Booking, ...] | None = None  # what the calls owe, once generate ended


@dataclass
class AttemptReport:
    """What happened to one attempt: the event the worker publishes when an attempt ends
    (metrics, the publisher's timer and tests subscribe)."""

    item: ClaimedItem
    outcome: Outcome
    reason: FailureReason | None = None
    error: str | None = None
    generation_seconds: float | None = None
    item_seconds: float = 0.0
    result: GenerationResult | None = None
    costs: tuple[Decimal, ...] = ()  # GBP per usage of ``result`` (or of a failed attempt)
    reserved_gbp: Decimal = Decimal(0)  # the worst case the attempt reserved
    delivery: Delivery | None = None  # a success: due when, and visible since when (if yet)
    flow_wait_seconds: float = 0.0  # waited on the provider limiter's tokens
    role: Role = Role.PRIMARY  # the generator the attempt used


@dataclass
class _Failure:
    reason: FailureReason
    message: str
    retryable: bool
    retry_after: float | None = None
    usages: tuple[TokenUsage, ...] = ()  # what the failed attempt is known to have consumed
    stated: Limits | None = None  # the limits a 429 stated
    refused: bool = False  # the provider certainly did not run the (implied) call
    paused: bool = False  # flow control held the call back: no feedback to give


def _known_usages(usages: Sequence[object]) -> tuple[TokenUsage, ...]:
    """The usages a failed attempt reported, if every one is well formed; otherwise none (the
    reserved worst case is then booked as an estimate instead of garbage)."""
    known = tuple(u for u in usages if isinstance(u, TokenUsage) and _sane(u))
    return known if len(known) == len(usages) else ()


def _sane(usage: TokenUsage) -> bool:
    counts = (usage.prompt_tokens, usage.completion_tokens)
    return (isinstance(usage.model, str) and bool(usage.model.strip())
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts))


class Worker:
    """Claims and processes items with up to ``settings.concurrency`` in flight."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        generator: Generator,
        budget: Budget,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        events: EventHub | None = None,
        flow: FlowControl | None = None,
        fallback: Generator | None = None,
        fallback_flow: FlowControl | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.pool = pool
        self.generator = generator
        self.budget = budget
        self.notifier: Notifier = notifier or LogNotifier()
        self.clock = clock
        # Attempts, claims, claim-loop ticks and notifications are published here.
        self.events = events or EventHub()
        # Flow control at the provider: admission per limit key, shared through the database.
        self.flow = flow or FlowControl(
            pool, limit_key_of(generator),
            Limits(settings.llm_requests_per_minute, settings.llm_tokens_per_minute),
            concurrency=settings.concurrency)
        # The fallback generator (MF_FALLBACK_GENERATOR), paced by its own limit key.
        self.fallback = fallback
        self.fallback_flow = fallback_flow or (None if fallback is None else FlowControl(
            pool, limit_key_of(fallback),
            Limits(settings.llm_fallback_requests_per_minute,
                   settings.llm_fallback_tokens_per_minute),
            concurrency=settings.concurrency))
        # The last outcome of a call to the generator that this process saw (None: none yet),
        # and when it last failed transiently (monotonic): the fallback decision's input.
        self._primary_ok: bool | None = None
        self._primary_failed_at = -float("inf")
        # Keyed by claim token, never by item id: the same item can be claimed again by this
        # very worker (reaped, or cancelled and retried) while its old attempt still runs.
        self.in_flight: dict[int, InFlight] = {}
        self._last_tick = time.monotonic()  # the claim loop's, for /healthz and the watchdog
        # Liveness: since when claiming has been going wrong (None: it is not), and why. The
        # clock starts at the last round that was fine: it claimed, had nothing it could claim,
        # had no room, or the provider held its calls.
        self._starving: Starvation | None = None
        self._fine_at = time.monotonic()
        self._starving_reported = False
        self._claim_error: str | None = None
        self.wake = asyncio.Event()
        self._claim_chunk = min(MAX_CLAIM, max(1, -(-settings.concurrency // CLAIM_SHARE)))
        self._prepares: Batcher[ClaimedItem, Prepared] = Batcher(
            self._prepare_batch, name="prepare", max_batch=MAX_BATCH, max_flushes=FLUSHES,
            min_share=MIN_SHARE, shared_errors=TRANSIENT_DB_ERRORS,
            item_errors=ITEM_DB_ERRORS)
        self._fallback_prepares: Batcher[ClaimedItem, Prepared] = Batcher(
            partial(self._prepare_batch, role=Role.FALLBACK), name="prepare (fallback)",
            max_batch=MAX_BATCH, max_flushes=FLUSHES, min_share=MIN_SHARE,
            shared_errors=TRANSIENT_DB_ERRORS, item_errors=ITEM_DB_ERRORS)
        self._writes: Batcher[EpisodeWrite, Delivery] = Batcher(
            self._write_batch, name="final write", max_batch=MAX_BATCH, max_flushes=FLUSHES,
            min_share=MIN_SHARE, shared_errors=TRANSIENT_DB_ERRORS,
            item_errors=ITEM_DB_ERRORS)
        self._slot_freed = asyncio.Event()
        # Where this process's claims stopped among the due organisations (fair turns).
        self._rotation = queue.OrganizationRotation()
        self._stopping = asyncio.Event()
        self._log = get_logger("mf_worker.worker")

    # -- the claim loop ------------------------------------------------------------------------

    async def run(self, *, burst: bool = False) -> None:
        """Claim and dispatch until :meth:`stop` (or, with ``burst``, until nothing is due and
        nothing is in flight)."""
        failures = 0
        drained = False
        # After a failed claim: 1, 2, 4 … s, at most two poll intervals (and 30 s) apart.
        claim_cap = min(self.settings.poll_interval * 2, 30.0)
        claim_retry = Backoff(initial=min(1.0, claim_cap), cap=claim_cap)
        while not self._stopping.is_set():
            self._tick()
            free = self.settings.concurrency - len(self.in_flight)
            if free <= 0:
                self._claiming_fine()
                # Bounded, so a full worker still ticks (health) while its items run.
                await self._wait({self._slot_freed}, self.settings.poll_interval)
                continue
            self.wake.clear()
            wanted = min(free, self._claim_chunk)
            items: list[ClaimedItem] = []
            failed: BaseException | None = None
            try:
                # Claim only what the provider's budget admits; otherwise sleep until the
                # refill (or until an item ends and frees a slot of the window, whose use is
                # the count of items this process holds: nothing to leak).
                # After a claim that found nothing, ask for one request only: an idle worker
                # must not keep taking (and giving back) the fleet's budget at every poll.
                admitted, flow_wait = await self.flow.admit(
                    1 if drained and self.flow.enabled else wanted, in_use=len(self.in_flight))
                unadmitted = 0
                if admitted == 0 and flow_wait is not None and self.fallback is not None:
                    # The generator's key is held or paced: with a fallback, items due soon
                    # must still be claimed (each decides; one with time to spare goes back
                    # for the decision point, the rest take their requests one by one).
                    unadmitted = 1 if drained else wanted
                if admitted == 0 and unadmitted == 0:
                    # Held by the provider's pace or cooldown, or a window full of this
                    # process's own items: fine. A window full with nothing held is not.
                    if flow_wait is not None or self.in_flight:
                        self._claiming_fine()
                    else:
                        self._claiming_starved(Starvation.FLOW_BLOCKED)
                    await self._wait({self._slot_freed},
                                     self.settings.poll_interval if flow_wait is None
                                     else min(flow_wait, self.settings.poll_interval))
                    continue
                wanted = admitted or unadmitted
                try:
                    items = await self._claim(wanted)
                finally:
                    # Whatever happened: every claimed item runs, and every admitted request
                    # that no item took goes back (a failed claim, a short one).
                    for item in items:
                        self._start(item, admitted=self.flow.enabled and admitted > 0)
                    if admitted and len(items) < wanted:
                        await self._give_back_requests(wanted - len(items))
                drained = not items
                failures = 0
            except CLAIM_ERRORS as exc:
                failed = exc
            if failed is not None:
                # Whatever the database said, the daemon goes on (and drains at a signal): it
                # backs off, and /healthz turns red if this lasts (MF_HEALTH_STARVED_SECONDS).
                failures += 1
                delay = claim_retry.delay(failures)
                self._claim_error = describe_error(failed)
                self._claiming_starved(Starvation.CLAIM_FAILING)
                self._log.warning("claim_failed", error=self._claim_error, retry_in=delay,
                                  transient=isinstance(failed, TRANSIENT_DB_ERRORS))
                await self._wait(set(), delay)
                continue
            if items:
                self._claiming_fine()
            if len(items) < wanted:
                if burst and not items:
                    if not self.in_flight:
                        return
                    await self._wait({self._slot_freed}, self.settings.poll_interval)
                    continue
                timeout, capped = await self._idle_timeout(claimed=len(items))
                # Due items that this claim could not take (their organisations at
                # MF_ORG_MAX_IN_FLIGHT, rows someone holds): claim again when a slot of ours
                # frees (an organisation's cap with it), a notification comes, or the poll
                # interval ends; not at once, which made an idle worker spin.
                await self._wait({self.wake, self._slot_freed} if burst or capped
                                 else {self.wake}, timeout)

    async def _give_back_requests(self, count: int) -> None:
        """Admitted requests no claimed item took go back to the key's bucket; if even that
        fails (the database is away), the bucket's refill makes up for them."""
        try:
            await self.flow.unused(count)
        except TRANSIENT_DB_ERRORS as exc:
            self._log.warning("flow_correction_failed", error=describe_error(exc))

    async def _claim(self, limit: int) -> list[ClaimedItem]:
        async with self.pool.connection() as conn:
            items = await queue.claim_due_items(
                conn, worker=self.worker_id, limit=limit,
                lease_seconds=self.settings.lease_seconds,
                org_max_in_flight=self.settings.org_max_in_flight, rotation=self._rotation,
            )
        if items:
            self.events.publish(ItemsClaimed(items, time.time()))
        return items

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        why, seconds = self.starved()
        if (why is not None and not self._starving_reported
                and seconds >= self.settings.health_starved_seconds):
            self._starving_reported = True
            self._log.error("claims_starving", reason=why.value, seconds=round(seconds, 1),
                            in_flight=len(self.in_flight), error=self.starved_detail())
        self.events.publish(ClaimLoopTicked(len(self.in_flight)))

    def claim_loop_age(self) -> float:
        """Seconds since the claim loop last went round (for /healthz and the watchdog)."""
        return time.monotonic() - self._last_tick

    def _claiming_fine(self) -> None:
        """This round claimed, or had nothing it should claim: the liveness clock restarts."""
        self._fine_at = time.monotonic()
        if self._starving is not None and self._starving_reported:
            self._log.info("claims_resumed", after=self._starving.value)
        self._starving, self._starving_reported, self._claim_error = None, False, None

    def _claiming_starved(self, why: Starvation) -> None:
        """This round should have claimed and did not: the clock runs on from the last round
        that was fine."""
        self._starving = why

    def starved(self) -> tuple[Starvation | None, float]:
        """Why, and for how many seconds, this process has had room but claimed nothing it
        should have (None, 0 while claiming is fine; and once stopping: a drain claims
        nothing by design). /healthz, the watchdog and the metrics read it."""
        if self._starving is None or self.stopping:
            return None, 0.0
        return self._starving, time.monotonic() - self._fine_at

    def starved_detail(self) -> str | None:
        """The last claim's error while claims fail (for /healthz)."""
        return self._claim_error if self._starving is Starvation.CLAIM_FAILING else None

    async def _idle_timeout(self, *, claimed: int) -> tuple[float, bool]:
        """After a claim that came back short: how long to sleep (until the next item is due,
        never longer than the poll interval), and whether items are due that the claim could
        not take (then a freed slot is a reason to claim again too)."""
        timeout = self.settings.poll_interval
        try:
            async with self.pool.connection() as conn:
                due = await queue.read_due_state(
                    conn, org_max_in_flight=self.settings.org_max_in_flight)
        except CLAIM_ERRORS:
            return timeout, False
        if due.due_in_seconds is None or due.due_in_seconds > 0:
            if not claimed:
                self._claiming_fine()  # nothing due: nothing to claim
            return (timeout if due.due_in_seconds is None
                    else min(timeout, due.due_in_seconds + 0.005)), False
        if claimed:
            return 0.005, False  # a short claim (others took the rest): look again at once
        if due.claimable:
            self._claiming_starved(Starvation.CLAIMS_EMPTY)
        else:
            self._claiming_fine()  # every due item's organisation is at its cap
        return timeout, True

    async def _wait(self, events: set[asyncio.Event], timeout: float | None) -> None:  # noqa: ASYNC109
        waiters = [asyncio.ensure_future(e.wait()) for e in (*events, self._stopping)]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._slot_freed.clear()

    def _start(self, item: ClaimedItem, *, admitted: bool = False) -> None:
        entry = InFlight(item=item, admitted=admitted)
        self.in_flight[item.token] = entry
        entry.task = asyncio.create_task(self.process(entry), name=f"item {item.id}")
        entry.task.add_done_callback(partial(self._finished, item.token))

    def _finished(self, token: int, _task: object = None) -> None:
        """A task removes its own claim's entry, and only that one."""
        self.in_flight.pop(token, None)
        self._slot_freed.set()

    def stop(self) -> None:
        """Stop claiming (safe to call twice); in-flight items carry on until :meth:`drain`."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- one item ------------------------------------------------------------------------------

    async def process(self, entry: InFlight) -> Outcome:
        """Run one claimed item to an outcome and record it; never raises except cancellation
        for shutdown (the caller then releases the item)."""
        item = entry.item
        started = time.monotonic()
        with bind_item(queue_id=item.id, project_id=item.project_id,
                       organization_id=item.organization_id, attempt=item.attempt):
            report = AttemptReport(item=item, outcome=Outcome.FAILED)
            try:
                await self._process(entry, report)
            except asyncio.CancelledError:
                if not entry.lost:
                    raise  # shutdown: drain() hands the item back
                report.outcome, report.reason = Outcome.LEASE_LOST, FailureReason.LOST_WORKER
            except LeaseLost:
                report.outcome, report.reason = Outcome.LEASE_LOST, FailureReason.LOST_WORKER
            except TRANSIENT_DB_ERRORS as exc:
                # The database stayed away longer than our retries: the lease will expire and
                # the reaper returns the item, so nothing is lost.
                report.reason, report.error = FailureReason.DATABASE, describe_error(exc)
                report.outcome = Outcome.LEASE_LOST
            except Exception as exc:
                # A bug of ours, not the generator's: leave the item to the reaper, which returns
                # it when the lease (no longer renewed) expires, and keep the daemon running.
                self._log.exception("item_crashed", error=describe_error(exc))
                report.reason, report.error = FailureReason.LOST_WORKER, describe_error(exc)
                report.outcome = Outcome.LEASE_LOST
            # However it ended before any call (its claim gone before the prepare, an
            # operator's cancel, the database away, a bug): the claim's request goes back.
            await self._give_back_flow(entry)
            report.item_seconds = time.monotonic() - started
            # Within the item's bind_item context: metrics, the log (observability.event_log:
            # item_completed, lease_lost, …) and the publisher's timer subscribe.
            self.events.publish(report)
            return report.outcome

    def _generator(self, entry: InFlight) -> Generator:
        if entry.role is Role.FALLBACK:
            assert self.fallback is not None
            return self.fallback
        return self.generator

    def _flow(self, entry: InFlight) -> FlowControl:
        if entry.role is Role.FALLBACK:
            assert self.fallback_flow is not None
            return self.fallback_flow
        return self.flow

    async def _fallback_reason(self, item: ClaimedItem) -> str | None:
        """Why this item should go to the fallback generator, or None (no fallback, time to
        spare, or the generator can serve it): only an item due within MF_FALLBACK_BEFORE
        moves, when the generator's key is held (a cooldown, a quota pause: read, not probed)
        or its calls fail transiently (the item's own last attempt, or any call of this
        process in the last PRIMARY_PROBE_SECONDS with no success since)."""
        if self.fallback is None:
            return None
        due_in = (item.scheduled_for - self.clock()).total_seconds()
        if due_in > self.settings.fallback_before:
            return None
        if item.deferred_reason == "transient" and self._primary_ok is not True:
            return "transient"
        if (self._primary_ok is False
                and time.monotonic() - self._primary_failed_at < PRIMARY_PROBE_SECONDS):
            return "transient"
        try:
            hold = await self.flow.held()
        except TRANSIENT_DB_ERRORS:
            return None
        return None if hold is None else hold[0]

    async def _route(self, entry: InFlight, report: AttemptReport) -> None:
        """Decide, once per attempt and before anything is reserved, which generator serves
        the item; a move gives the generator's request back and says so."""
        item = entry.item
        reason = await self._fallback_reason(item)
        if reason is None:
            return
        await self._give_back_flow(entry)
        entry.admitted = False  # the fallback's calls take their own requests
        entry.role = report.role = Role.FALLBACK
        due_in = (item.scheduled_for - self.clock()).total_seconds()
        self._log.info("item_moved_to_fallback", reason=reason,
                          due_in_seconds=round(due_in, 3),
                          generator=self.settings.fallback_generator)
        self.events.publish(ItemMovedToFallback(item, reason, due_in))

    def _decision_in(self, entry: InFlight) -> float | None:
        """With a fallback, how long until an item on the generator reaches its fallback
        decision point (MF_FALLBACK_BEFORE before its instant, at least 0): a deferral must
        not put it back later than that. None: no fallback, or the item is on it already."""
        if self.fallback is None or entry.role is Role.FALLBACK:
            return None
        before = entry.item.scheduled_for - self.clock()
        return max(before.total_seconds() - self.settings.fallback_before, 0.0)

    async def _process(self, entry: InFlight, report: AttemptReport) -> None:
        item = entry.item
        await self._route(entry, report)
        prepares = self._fallback_prepares if entry.role is Role.FALLBACK else self._prepares
        flow, generator = self._flow(entry), self._generator(entry)
        try:
            prepared = await prepares.submit(item)
        except CostLimitReached as exc:
            await self._give_back_flow(entry)
            await self._trip(item, exc, report)
            return
        except ItemUnavailable as exc:
            await self._give_back_flow(entry)
            reason = str(exc)
            await self._db(partial(cancel_item, item=item, reason=reason))
            report.outcome, report.error = Outcome.CANCELLED, reason
            return
        except InvalidItemError as exc:
            await self._give_back_flow(entry)
            await self._record_failure(
                entry, None, _Failure(FailureReason.INVALID_ITEM, str(exc), retryable=False),
                report,
            )
            return

        entry.prepared = prepared
        # The attempt's calls go through its ledger: flow control admits each, and the
        # settlement books each by what the provider did with it.
        entry.calls = CallLedger(partial(self._admit_call, entry, report))
        request = dataclasses.replace(prepared.request, calls=entry.calls)
        # The first call's worst-case tokens from the provider's budget (the reservation's
        # estimate; the request is the one the claim took), corrected with the real usage
        # afterwards. A generator that reports no calls makes this one implied call.
        charged = 0
        if flow.enabled:
            estimate = estimate_max_usage(generator, request)
            charged = estimate.total_tokens if estimate is not None else 0
            try:
                report.flow_wait_seconds = await flow.take_tokens(
                    charged, requests=0 if entry.admitted else 1)
            except KeyCoolingDown as held:
                # No call was made: the request goes back, and so does the item, for when
                # the key's hold ends (no attempt used, no feedback: nothing new was learned).
                await self._give_back_flow(entry)
                reason = (FailureReason.QUOTA_EXHAUSTED if held.reason == "quota_exhausted"
                          else FailureReason.RATE_LIMITED)
                await self._defer(entry, prepared,
                                  _Failure(reason, str(held), True, held.seconds, refused=True),
                                  str(held), report, feedback=False, bookings=())
                return
        entry.flow_settled = True  # the claim's request is the first call's now
        entry.first_charge = charged
        entry.phase = "generating"
        report.reserved_gbp = prepared.reserved_gbp
        self._log.debug("generation_started", episode_id=prepared.episode_id)
        gen_started = time.monotonic()
        result, failure = await self._generate(generator, prepared, request)
        report.generation_seconds = time.monotonic() - gen_started
        entry.phase = "writing"
        calls = entry.calls.calls or _implied_calls(result, failure)
        entry.bookings = bookings = settlement(
            calls, reserved=prepared.reserved_gbp, prices=self.budget.prices)
        await self._flow_after_calls(entry, calls)
        if entry.role is Role.PRIMARY:
            self._primary_outcome(calls, failure)
        if failure is not None:
            await self._record_failure(entry, prepared, failure, report, bookings)
            return
        assert result is not None
        costs = tuple(self.budget.prices.cost(u) for u in result.usages)
        written_by = (self.settings.fallback_generator if entry.role is Role.FALLBACK
                      else self.settings.generator)
        try:
            report.delivery = await self._writes.submit(EpisodeWrite(
                item=item, prepared=prepared, result=result, costs=costs, now=self.clock(),
                lead_seconds=self.settings.lead_seconds, bookings=bookings,
                generator=f"{entry.role.value}:{written_by}", model=_models(result)))
        except ItemUnavailable as exc:  # the project was deleted while it generated
            report.outcome, report.error, report.costs = Outcome.CANCELLED, str(exc), costs
            return
        report.outcome, report.result, report.costs = Outcome.SUCCESS, result, costs

    def _primary_outcome(self, calls: Sequence[ProviderCall],
                         failure: _Failure | None) -> None:
        """What the generator's calls showed: an answered call means it serves again (items
        go back to it); a transient failure sends items due soon to the fallback for a while."""
        if any(c.outcome is CallOutcome.ANSWERED for c in calls) or failure is None:
            if self._primary_ok is False:
                self._log.info("generator_recovered")
            self._primary_ok = True
        elif failure.reason in (FailureReason.GENERATOR_RETRYABLE, FailureReason.TIMEOUT):
            self._primary_ok = False
            self._primary_failed_at = time.monotonic()

    async def _admit_call(self, entry: InFlight, report: AttemptReport, call: ProviderCall,
                          index: int) -> None:
        """The gate of the attempt's call ledger: the first call uses what was taken before
        `generate` (the claim's request, the attempt's worst-case tokens); each further call
        takes one more request and its own worst-case tokens, or is held back
        (`CallsPaused`) while the key is paused for longer than an item should wait."""
        if index == 0:
            call.charged_tokens = entry.first_charge
            return
        tokens = call.max_usage.total_tokens if call.max_usage is not None else 0
        try:
            report.flow_wait_seconds += await self._flow(entry).take_tokens(tokens, requests=1)
        except KeyCoolingDown as held:
            raise CallsPaused(str(held), held.seconds, reason=held.reason) from None
        call.charged_tokens = tokens

    async def _flow_after_calls(self, entry: InFlight, calls: Sequence[ProviderCall]) -> None:
        """Give back the tokens answered calls did not use (and grow the window); an answered
        call also shows the key's quota works (the next exhaustion is notified anew)."""
        answered = [c for c in calls if c.outcome is CallOutcome.ANSWERED and c.usage]
        flow = self._flow(entry)
        if not answered or not flow.enabled:
            return
        implied = not (entry.calls and entry.calls.calls)
        charged = entry.first_charge if implied else sum(c.charged_tokens for c in answered)
        used = sum(c.usage.total_tokens for c in answered if c.usage is not None)
        try:
            await flow.succeeded(charged, used)
            await flow.quota_recovered()
        except TRANSIENT_DB_ERRORS as exc:  # the episode matters more than the correction
            self._log.warning("flow_correction_failed", error=describe_error(exc))

    async def _prepare_batch(self, items: list[ClaimedItem], *, role: Role = Role.PRIMARY
                             ) -> list[PrepareOutcome]:
        # now=None: the billing day is the database's UTC day, whatever this host's clock says.
        # Each generator reserves its own worst case, priced by its own model.
        generator = self.fallback if role is Role.FALLBACK and self.fallback else self.generator
        return await self._db(partial(
            prepare_generations, items=items, now=None,
            worst_case=partial(self.budget.worst_case, generator),
            default_limit=self.budget.default_limit,
        ), alone=len(items) == 1)

    async def _write_batch(self, writes: list[EpisodeWrite]) -> list[WriteOutcome]:
        return await self._db(partial(write_episodes, writes=writes), alone=len(writes) == 1)

    async def _generate(
        self, generator: Generator, prepared: Prepared, request: GenerationRequest
    ) -> tuple[GenerationResult | None, _Failure | None]:
        timeout = self.settings.generation_timeout
        raw: object = None
        try:
            raw = await asyncio.wait_for(generator.generate(request), timeout)
            return validate_result(raw, prepared.request,
                                   max_episode_bytes=self.settings.max_episode_bytes), None
        except CallsPaused as exc:
            return None, _Failure(
                FailureReason.QUOTA_EXHAUSTED if exc.reason == "quota_exhausted"
                else FailureReason.RATE_LIMITED, str(exc), True, exc.retry_after,
                refused=True, paused=True)
        except RateLimitedError as exc:
            return None, _Failure(FailureReason.RATE_LIMITED, str(exc), True, exc.retry_after,
                                  stated=Limits(exc.requests_per_minute, exc.tokens_per_minute),
                                  refused=True)
        except QuotaExhaustedError as exc:
            return None, _Failure(FailureReason.QUOTA_EXHAUSTED, str(exc), True,
                                  exc.retry_after, refused=True)
        except RetryableGenerationError as exc:
            return None, _Failure(FailureReason.GENERATOR_RETRYABLE, str(exc), True,
                                  exc.retry_after, usages=_known_usages(exc.usages))
        except TimeoutError:
            return None, _Failure(FailureReason.TIMEOUT,
                                  f"generation timed out after {timeout:g} s", True)
        except InvalidOutputError as exc:
            # Output that fails validation was still generated, and billed: book its usage.
            usages = exc.usages or (raw.usages if isinstance(raw, GenerationResult) else ())
            return None, _Failure(FailureReason.INVALID_OUTPUT, f"invalid output: {exc}", False,
                                  usages=_known_usages(usages))
        except PermanentGenerationError as exc:
            return None, _Failure(FailureReason.GENERATOR_PERMANENT, str(exc), False,
                                  usages=_known_usages(exc.usages))
        except ConnectionError as exc:
            # A refused connection sent nothing; a reset or an abort may have come mid-reply.
            return None, _Failure(FailureReason.GENERATOR_RETRYABLE,
                                  f"generator connection failed: {describe_error(exc)}", True,
                                  refused=isinstance(exc, ConnectionRefusedError))
        except Exception as exc:  # a plugin bug: it would very likely repeat
            return None, _Failure(FailureReason.GENERATOR_PERMANENT,
                                  f"generator raised {describe_error(exc)}", False)

    async def _record_failure(
        self, entry: InFlight, prepared: Prepared | None, failure: _Failure,
        report: AttemptReport, bookings: tuple[Booking, ...] | None = None,
    ) -> None:
        item = entry.item
        message = failure.message[:MAX_ERROR_CHARS]
        if failure.retryable:
            await self._defer(entry, prepared, failure, message, report, bookings=bookings)
            return
        await self._db(partial(write_failure, item=item, prepared=prepared, error=message,
                               retry_in=None, bookings=bookings))
        report.costs = tuple(b.cost for b in bookings or ())
        report.outcome = Outcome.FAILED
        report.reason, report.error = failure.reason, message
        self._log.warning("attempt_failed", reason=failure.reason.value, error=message,
                          retry_in=None)

    async def _defer(
        self, entry: InFlight, prepared: Prepared | None, failure: _Failure, message: str,
        report: AttemptReport, *, feedback: bool = True,
        bookings: tuple[Booking, ...] | None = None,
    ) -> None:
        """A call that does not use up an attempt. A rate limit holds the fleet's calls under
        the key until the provider's reset and puts the item back for then; an exhausted quota
        pauses the key (the first worker to see it since calls last succeeded notifies, once
        per exhaustion) and the item waits; a transient failure backs off until
        MF_RETRY_DEADLINE or the project's next occurrence. Whatever the kind, ``bookings``
        (what the attempt's calls owe) are booked."""
        item = entry.item
        flow = self._flow(entry)
        retry_after = failure.retry_after
        feedback = feedback and not failure.paused
        kind = "transient"
        if failure.reason is FailureReason.RATE_LIMITED:
            kind = "rate_limited"
            if feedback:
                await self._flow_feedback(flow.rate_limited(retry_after or 1.0,
                                                            failure.stated or Limits()))
        elif failure.reason is FailureReason.QUOTA_EXHAUSTED and not feedback:
            kind = "quota_exhausted"
        elif failure.reason is FailureReason.QUOTA_EXHAUSTED:
            kind = "quota_exhausted"
            hold = await self._flow_feedback(flow.quota_exhausted(retry_after or 600.0))
            if hold is not None:
                retry_after = max((hold.until - self.clock()).total_seconds(), 0.0)
                if (flow.key is not None
                        and await self._flow_feedback(flow.claim_quota_notice())):
                    await self._notify_paused(ProviderPaused(
                        limit_key=flow.key, reason=kind, paused_until=hold.until,
                        error=message))
        backoff = _item_backoff()
        decision_in = self._decision_in(entry)
        if decision_in is not None:
            # Back in time for the fallback decision, whatever the provider's wait or the
            # backoff would say (it then goes to the fallback, or waits again).
            retry_after = None if retry_after is None else min(retry_after, decision_in)
            backoff = (backoff[0], min(backoff[1], decision_in), backoff[2])
        deferral = await self._db(partial(
            write_deferral, item=item, prepared=prepared, reason=kind, error=message,
            retry_after=retry_after, deadline_seconds=self.settings.retry_deadline,
            not_after=_next_occurrence(item), backoff=backoff, bookings=bookings))
        report.costs = tuple(b.cost for b in bookings or ())
        failed = deferral.status == "failed"
        if failed:
            message = deferral.error
            report.outcome = Outcome.FAILED
        else:
            report.outcome = Outcome.RETRY if kind == "transient" else Outcome.DEFERRED
        report.reason, report.error = failure.reason, message
        self._log.warning("attempt_failed" if kind == "transient" else "attempt_deferred",
                          reason=failure.reason.value, error=message,
                          retry_in=None if failed else round(deferral.delay_seconds, 3))

    async def _flow_feedback(self, work: Awaitable[T]) -> T | None:
        try:
            return await work
        except TRANSIENT_DB_ERRORS as exc:  # the item is put back either way
            self._log.warning("flow_feedback_failed", error=describe_error(exc))
            return None

    async def _give_back_flow(self, entry: InFlight) -> None:
        """The item ends before any call: the request the claim took for it goes back to the
        key's bucket (an item claimed by ``run-once`` took none)."""
        if entry.flow_settled or not entry.admitted:
            return
        entry.flow_settled = True
        try:
            await self.flow.unused(1)
        except CLAIM_ERRORS as exc:  # any database error: the bucket's refill makes up for it
            self._log.warning("flow_correction_failed", error=describe_error(exc))

    async def _notify_paused(self, event: ProviderPaused) -> None:
        try:
            await notify_provider_paused(self.notifier, event)
        except Exception as exc:  # the key is paused either way; say so loudly
            self._log.error("notification_failed", error=describe_error(exc),
                            limit_key=event.limit_key)

    async def _trip(self, item: ClaimedItem, reached: CostLimitReached,
                    report: AttemptReport) -> None:
        """The budget cannot cover this item: block it and its organisation's pending items
        (no attempt charged); the day's first trip notifies the operator. Refused only by
        reservations in flight, it waits a little instead (deferred; no trip)."""
        trip = await self._db(partial(trip_breaker, item=item, reached=reached))
        report.error = str(reached)
        if reached.by_reservations:
            report.outcome = Outcome.DEFERRED
            self._log.info("item_waiting_for_reservations", error=str(reached))
            return
        report.outcome = Outcome.BLOCKED
        self._log.warning("item_blocked_by_cost_limit", error=str(reached),
                          first_today=trip is not None)
        if trip is None:
            return
        await deliver_trip(self.pool, self.notifier, trip, self._notified)

    def _notified(self, delivered: bool) -> None:
        self.events.publish(TripNotified(delivered))

    async def _db(self, work: Callable[[Connection], Awaitable[T]], *, alone: bool = True) -> T:
        """Run one transaction-sized unit of work on a pooled connection, retrying the whole
        unit (never half a transaction) while the database is unreachable, up to one lease.

        A unit of several items (``alone`` false) is not retried on a lock or statement
        timeout: one item's row locked by someone else must not hold up the rest, so the
        batcher splits the batch instead and retries each item alone."""
        retryable: retry_base = retry_if_exception_type(TRANSIENT_DB_ERRORS)
        if not alone:
            retryable = retryable & retry_if_not_exception_type(ITEM_DB_ERRORS)
        async for attempt in AsyncRetrying(
            retry=retryable,
            wait=DB_RETRY.wait,
            stop=stop_after_delay(self.settings.lease_seconds),
            reraise=True,
        ):
            with attempt:
                async with self.pool.connection() as conn:
                    return await work(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- leases and shutdown -------------------------------------------------------------------

    def abandon_lost(self, lost: set[int]) -> None:
        """The heartbeat found these claims (tokens) gone: stop generating (the write would be
        refused). A newer claim of the same item is another entry, untouched."""
        for token in lost:
            entry = self.in_flight.get(token)
            if entry is None or entry.phase != "generating" or entry.task is None:
                continue
            entry.lost = True
            entry.task.cancel()

    async def drain(self, grace: float) -> int:
        """After :meth:`stop`: let in-flight items finish for ``grace`` seconds, then hand the
        rest back to the queue: without charging an attempt if the generator call had not
        started, else booking its reservation and keeping the attempt used. Returns how many
        were released."""
        tasks = [e.task for e in self.in_flight.values() if e.task is not None]
        if tasks:
            self._log.info("draining", in_flight=len(tasks), grace_seconds=grace)
            await asyncio.wait(tasks, timeout=grace)
        leftovers = [e for e in self.in_flight.values() if e.task is not None]
        for entry in leftovers:
            assert entry.task is not None
            entry.task.cancel()
        await asyncio.gather(*(e.task for e in leftovers if e.task), return_exceptions=True)
        released = 0
        for entry in leftovers:
            called = entry.phase != "preparing"
            bookings = entry.bookings
            if bookings is None and called and entry.calls is not None and entry.calls.calls:
                # Stopped mid-generation: the calls it reported are booked by what became of
                # them (the one cut short is unknown: its worst case, estimated).
                reserved = entry.prepared.reserved_gbp if entry.prepared else Decimal(0)
                bookings = settlement(entry.calls.calls, reserved=reserved,
                                      prices=self.budget.prices)
            try:
                # A generation that had started may have been billed: what its calls owe is
                # booked (a generator that reports no calls: its whole reservation, as an
                # estimate) and its attempt stays used. One still preparing is handed back
                # whole.
                held = await self._db(partial(write_release, item=entry.item,
                                              prepared=entry.prepared, called=called,
                                              bookings=bookings))
            except TRANSIENT_DB_ERRORS as exc:
                self._log.error("release_failed", queue_id=entry.item.id,
                                error=describe_error(exc))
                continue
            if held:
                released += 1
                # Stopped before any call: the request the claim took for it goes back too
                # (only when the database answered the release: a drain does not wait twice).
                await self._give_back_flow(entry)
                with bind_item(queue_id=entry.item.id, project_id=entry.item.project_id,
                               organization_id=entry.item.organization_id,
                               attempt=entry.item.attempt):
                    self._log.info("item_released")
                self.events.publish(AttemptReport(item=entry.item, outcome=Outcome.RELEASED))
        return released


def _implied_calls(result: GenerationResult | None, failure: _Failure | None
                   ) -> tuple[ProviderCall, ...]:
    """The calls of a generator that reported none, as one call implied by how it ended: its
    result's usage, or its error's usage when it carried some (a billed refusal); nothing for
    a rate limit, an exhausted quota or a refused connection (the provider ran nothing); else
    unknown, with no bound of its own, so the whole reservation is its estimate."""
    if result is not None:
        usages = result.usages
    elif failure is not None and failure.usages:
        usages = failure.usages
    elif failure is not None and failure.refused:
        return ()
    else:
        return (ProviderCall("generate"),)
    calls = []
    for usage in usages:
        call = ProviderCall("generate")
        call.answered(usage)
        calls.append(call)
    return tuple(calls)


def _models(result: GenerationResult) -> str | None:
    """The model(s) a result says wrote it, comma-separated in order of use."""
    return ",".join(dict.fromkeys(u.model for u in result.usages)) or None


def _item_backoff() -> tuple[float, float, float]:
    """What ``queue.defer_item`` needs of :data:`ITEM_RETRY` to compute a transient failure's
    wait under the item's row lock, from its ``retry_count``: the base, the cap and one draw of
    the jitter."""
    return ITEM_RETRY.initial, ITEM_RETRY.cap, ITEM_RETRY.jitter_factor()


def _next_occurrence(item: ClaimedItem) -> datetime | None:
    """The project's next delivery after this item's, from the item's metadata (a transient
    failure is not retried past it); None when the item does not say (a manual item)."""
    meta = item.metadata
    try:
        return next_occurrence(meta["cadence"], dt_time.fromisoformat(meta["delivery_time"]),
                               meta["user_timezone"], item.scheduled_for)
    except (KeyError, TypeError, ValueError):
        return None
