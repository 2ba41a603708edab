"""Every Prometheus metric mf-worker exports, declared in one place.

Names follow Prometheus conventions: the ``mf_worker_`` prefix, base units in the name
(``_seconds``), ``_total`` on counters, and small fixed label sets — never an id as a label
(spend per organisation lives in ``token_usage_daily``, not in Prometheus). The engine does not
call metrics directly: :meth:`Metrics.subscribe` registers its handlers on the event hub
(``engine.events``) for the worker's attempt reports, claims and claim-loop ticks, flow
control, notifications, the reaper, the publisher and the scheduler, the way Oban's telemetry
handlers do. Queue depth and the
age of the oldest due item are read from the database at scrape time (cached briefly), so every
replica reports the same truth.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..engine.events import (
    ClaimLoopTicked,
    EventHub,
    ItemMovedToFallback,
    ItemsClaimed,
    SchedulerPassed,
    TripNotified,
)
from ..engine.worker import (
    FALLBACK_REASONS,
    AttemptReport,
    FailureReason,
    Outcome,
    Role,
    Starvation,
)
from ..flow import FlowEvent
from ..maintenance.publisher import ON_TIME_SECONDS, Publication, Withdrawal
from ..queue import ReapedItem
from .queue_depth import STATUSES

# Seconds; generation spans a template call (ms) to a long LLM call (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# Seconds after the delivery instant: the publisher's timer (ms), a burst's tail (minutes), an
# item blocked by the cost limit until the next UTC day (hours).
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800,
                    3600, 7200, 21600, 86400)
TIMINGS = ("on_time", "late")

QueueReader = Callable[[], dict[str, Any]]
StarvedReader = Callable[[], tuple[Starvation | None, float]]


class Metrics:
    """The daemon's metrics, on a registry of its own (several daemons may share a process in
    tests)."""

    def __init__(self, *, concurrency: int, process_metrics: bool = True) -> None:
        # The client would also export a `<name>_created` gauge (a Unix time) beside every
        # counter and histogram: undocumented series that break the naming rules above and
        # that no dashboard or alert reads. Process-wide, like the client's own switch.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the client
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.attempts = Counter(
            "mf_worker_attempts_total", "Attempts at queue items, by how they ended.",
            ["outcome"], registry=r)
        self.failures = Counter(
            "mf_worker_failures_total", "Failed attempts, by reason class.", ["reason"],
            registry=r)
        self.generation_duration = Histogram(
            "mf_worker_generation_duration_seconds", "Time spent in the generator per attempt.",
            buckets=DURATION_BUCKETS, registry=r)
        self.item_duration = Histogram(
            "mf_worker_item_duration_seconds",
            "Time from claim to the end of an attempt (prepare, generate, write).",
            buckets=DURATION_BUCKETS, registry=r)
        self.queue_lag = Histogram(
            "mf_worker_queue_lag_seconds",
            "Delay between an item becoming due (run_after) and its claim.",
            buckets=LAG_BUCKETS, registry=r)
        self.lateness = Histogram(
            "mf_worker_delivery_lateness_seconds",
            "Publish time minus delivery instant of each episode made visible (ready).",
            buckets=LATENESS_BUCKETS, registry=r)
        self.published = Counter(
            "mf_worker_episodes_published_total",
            f"Episodes made visible, by timing: on_time (within {ON_TIME_SECONDS:g} s of the "
            "delivery instant) or late.", ["timing"], registry=r)
        self.withdrawn = Counter(
            "mf_worker_episodes_withdrawn_total",
            "Episodes generated early but withdrawn before their instant (project paused, "
            "archived, deleted or rescheduled).", registry=r)
        self.episodes_by_generator = Counter(
            "mf_worker_episodes_generated_total",
            "Episodes written, by the generator that wrote them: primary (MF_GENERATOR) or "
            "fallback (MF_FALLBACK_GENERATOR).", ["generator"], registry=r)
        for role in Role:
            self.episodes_by_generator.labels(role.value)
        self.fallback_moves = Counter(
            "mf_worker_fallback_moves_total",
            "Items due soon moved to the fallback generator, by why the primary could not "
            "serve them: rate_limited, quota_exhausted (its key held), transient (failing).",
            ["reason"], registry=r)
        for reason in FALLBACK_REASONS:
            self.fallback_moves.labels(reason)
        self.in_flight = Gauge(
            "mf_worker_in_flight_items", "Items this process is working on.", registry=r)
        self.concurrency = Gauge(
            "mf_worker_concurrency_items",
            "Configured maximum of items in flight (MF_CONCURRENCY).",
            registry=r)
        self.concurrency.set(concurrency)
        self.tokens = Counter(
            "mf_worker_tokens_total", "Tokens used by completed generations.",
            ["model", "kind"], registry=r)
        self.cost = Counter(
            "mf_worker_cost_gbp_total", "Cost of completed generations in GBP.", ["model"],
            registry=r)
        self.cost_overrun = Counter(
            "mf_worker_cost_overrun_gbp_total",
            "GBP by which attempts cost more than the worst case they reserved (a generator "
            "without an estimate reserves the flat MF_COST_RESERVE_GBP); the real cost is "
            "booked regardless.", registry=r)
        self.cost_limit_trips = Counter(
            "mf_worker_cost_limit_trips_total",
            "Items blocked by an organisation's daily cost limit.", registry=r)
        self.notifications = Counter(
            "mf_worker_cost_limit_notifications_total",
            "Attempts to notify a cost-limit trip (all of MF_NOTIFIER), by outcome: delivered, "
            "failed (retried later by the budget loop).", ["outcome"], registry=r)
        self.reaped = Counter(
            "mf_worker_items_reaped_total",
            "Items whose lease expired (a lost worker), by what the reaper did.", ["result"],
            registry=r)
        self.scheduled = Counter(
            "mf_worker_scheduler_items_created_total", "Queue items the scheduler created.",
            registry=r)
        self.invalid_projects = Gauge(
            "mf_worker_scheduler_invalid_projects",
            "Active projects skipped by the last scheduler pass (invalid cadence or zone).",
            registry=r)
        self.build_info = Gauge(
            "mf_worker_build_info", "Always 1; the labels say what is running.",
            ["version", "python_version"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.limiter_wait = Counter(
            "mf_worker_limiter_wait_seconds_total",
            "Seconds items and the claim loop waited on the provider limiter (pacing, "
            "cooldowns).", registry=r)
        self.rate_limited = Counter(
            "mf_worker_provider_rate_limited_total",
            "Calls the provider refused for its rate limit (HTTP 429), by limit key.",
            ["limit_key"], registry=r)
        self.cooldowns = Counter(
            "mf_worker_provider_cooldowns_total",
            "Fleet-wide holds on a limit key this process started, by key and reason.",
            ["limit_key", "reason"], registry=r)
        self.window = Gauge(
            "mf_worker_provider_window_items",
            "This process's adaptive in-flight window for its generator's limit key.",
            registry=r)
        self.claim_loop_tick = Gauge(
            "mf_worker_claim_loop_last_tick_timestamp_seconds",
            "When the claim loop last went round (a stuck loop stops moving this).", registry=r)
        self.claim_starved = Gauge(
            "mf_worker_claim_starved_seconds",
            "Seconds this process has had free slots without claiming what it should, by "
            "why: claim_failing (its claims fail), claims_empty (they come back empty while "
            "items it may take are due), flow_blocked (flow control admits none while it "
            "holds nothing); 0 while claiming is fine. /healthz fails past "
            "MF_HEALTH_STARVED_SECONDS.", ["reason"], registry=r)
        for why in Starvation:
            self.claim_starved.labels(why.value)
        for outcome in Outcome:
            self.attempts.labels(outcome.value)
        for reason in FailureReason:
            self.failures.labels(reason.value)
        for timing in TIMINGS:
            self.published.labels(timing)
        for notified in ("delivered", "failed"):
            self.notifications.labels(notified)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, events: EventHub) -> None:
        """Feed these metrics from ``events`` (every handler below, for its event type)."""
        events.subscribe(AttemptReport, self.on_attempt)
        events.subscribe(Publication, self.on_published)
        events.subscribe(Withdrawal, self.on_withdrawn)
        events.subscribe(FlowEvent, self.on_flow)
        events.subscribe(TripNotified, self.on_notified)
        events.subscribe(ItemsClaimed, self.on_claimed)
        events.subscribe(ReapedItem, self.on_reaped)
        events.subscribe(SchedulerPassed, self.on_scheduled)
        events.subscribe(ClaimLoopTicked, self.on_claim_loop_tick)
        events.subscribe(ItemMovedToFallback, self.on_moved_to_fallback)

    def on_attempt(self, report: AttemptReport) -> None:
        """Observer for the worker's attempt reports."""
        self.attempts.labels(report.outcome.value).inc()
        if report.reason is not None:
            self.failures.labels(report.reason.value).inc()
        if report.outcome is Outcome.BLOCKED:
            self.cost_limit_trips.inc()
        if report.generation_seconds is not None:
            self.generation_duration.observe(report.generation_seconds)
        if report.outcome is not Outcome.RELEASED:
            self.item_duration.observe(report.item_seconds)
        overrun = sum(report.costs, Decimal(0)) - report.reserved_gbp
        if overrun > 0:
            self.cost_overrun.inc(float(overrun))
        if report.delivery is not None and report.delivery.lateness_seconds is not None:
            self._delivered(report.delivery.lateness_seconds)  # finished after its instant
        if report.outcome is Outcome.SUCCESS:
            self.episodes_by_generator.labels(report.role.value).inc()
        if report.outcome is Outcome.SUCCESS and report.result is not None:
            for usage, cost in zip(report.result.usages, report.costs, strict=False):
                self.tokens.labels(usage.model, "prompt").inc(usage.prompt_tokens)
                self.tokens.labels(usage.model, "completion").inc(usage.completion_tokens)
                self.cost.labels(usage.model).inc(float(cost))

    def on_moved_to_fallback(self, event: ItemMovedToFallback) -> None:
        self.fallback_moves.labels(event.reason).inc()

    def on_published(self, publication: Publication) -> None:
        """Observer for the publisher: an episode made visible at (or after) its instant."""
        self._delivered(publication.lateness_seconds)

    def on_withdrawn(self, _withdrawal: Withdrawal) -> None:
        self.withdrawn.inc()

    def _delivered(self, lateness: float) -> None:
        self.lateness.observe(max(lateness, 0.0))
        self.published.labels("on_time" if lateness <= ON_TIME_SECONDS else "late").inc()

    def on_flow(self, event: FlowEvent) -> None:
        """Subscriber of the worker's flow control."""
        if event.kind == "wait":
            self.limiter_wait.inc(event.seconds)
        elif event.kind == "rate_limited":
            self.rate_limited.labels(event.key).inc()
        elif event.kind == "cooldown":
            self.cooldowns.labels(event.key, event.reason or "rate_limited").inc()
        elif event.kind == "window":
            self.window.set(event.value)

    def on_notified(self, event: TripNotified) -> None:
        self.notifications.labels("delivered" if event.delivered else "failed").inc()

    def on_claimed(self, event: ItemsClaimed) -> None:
        for item in event.items:
            self.queue_lag.observe(max(event.claimed_at - item.run_after.timestamp(), 0.0))

    def on_reaped(self, item: ReapedItem) -> None:
        self.reaped.labels("failed" if item.status == "failed" else "returned").inc()

    def on_scheduled(self, event: SchedulerPassed) -> None:
        self.scheduled.inc(event.created)
        self.invalid_projects.set(event.invalid_projects)

    def on_claim_loop_tick(self, event: ClaimLoopTicked) -> None:
        self.claim_loop_tick.set(time.time())
        self.in_flight.set(event.in_flight)

    def watch_claims(self, starved: StarvedReader) -> None:
        """Export the claim loop's starvation (`Worker.starved`), read at scrape time."""
        for why in Starvation:
            self.claim_starved.labels(why.value).set_function(_starved_for(starved, why))

    def watch_queue(self, read: QueueReader, *, cache_seconds: float = 5.0) -> None:
        """Export queue depth and oldest-due age, read by ``read`` at scrape time (cached)."""
        self.registry.register(_QueueCollector(read, cache_seconds))


def _starved_for(starved: StarvedReader, why: Starvation) -> Callable[[], float]:
    def read() -> float:
        reason, seconds = starved()
        return seconds if reason is why else 0.0

    return read


class _QueueCollector(Collector):
    """Queue depth by status and the oldest due item's age, from the database, cached."""

    def __init__(self, read: QueueReader, cache_seconds: float) -> None:
        self._read, self._cache_seconds = read, cache_seconds
        self._cached: dict[str, Any] | None = None
        self._read_at = 0.0

    def describe(self) -> Iterable[Metric]:
        return []  # read the database only when scraped, never at registration

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        if self._cached is None or now - self._read_at > self._cache_seconds:
            try:
                self._cached, self._read_at = self._read(), now
            except Exception:  # an unreachable database must not break the whole scrape
                self._cached = None
        if self._cached is None:
            return
        depth = GaugeMetricFamily("mf_worker_queue_items",
                                  "Queue items by status (the whole queue, read from the "
                                  "database; pending, completed, failed and cancelled are "
                                  "estimated above 100,000 rows).", labels=["status"])
        for status in STATUSES:
            depth.add_metric([status], self._cached["counts"].get(status, 0))
        yield depth
        yield GaugeMetricFamily(
            "mf_worker_queue_oldest_due_age_seconds",
            "How long the oldest due pending item has been waiting (0 when none is due).",
            value=self._cached["oldest_due_age_seconds"] or 0.0)
        yield GaugeMetricFamily(
            "mf_worker_queue_late_items",
            "Items whose delivery instant has passed while their episode is not visible yet "
            "(waiting, running, blocked, or not published within a second).",
            value=self._cached.get("late_items", 0))
        level = GaugeMetricFamily(
            "mf_worker_provider_bucket_level",
            "What a limit key's fleet-wide bucket holds (requests or tokens; negative: a debt "
            "the refill pays off), read from the database.", labels=["limit_key", "kind"])
        cooling = GaugeMetricFamily(
            "mf_worker_provider_cooldown_seconds",
            "Seconds until a limit key's fleet-wide hold ends (0: none), by reason.",
            labels=["limit_key", "reason"])
        wall = datetime.now(UTC)
        for key in self._cached.get("limits", []):
            for kind, value in (("requests", key["request_level"]),
                                ("tokens", key["token_level"])):
                if value is not None:
                    level.add_metric([key["limit_key"], kind], value)
            for reason in ("rate_limited", "quota_exhausted"):
                until = key["cooldown_until"] if key["cooldown_reason"] == reason else None
                cooling.add_metric([key["limit_key"], reason],
                                   max((until - wall).total_seconds(), 0.0) if until else 0.0)
        yield level
        yield cooling
