"""``mf-worker run``: the worker, its loops and the signal handling, wired together.

The composition root: the one module that knows every part (the engine, the maintenance
loops, observability) and connects them through one event hub; nothing imports it but the
command line.

Start-up refuses a database with pending migrations. SIGTERM or SIGINT starts a drain: stop
claiming, let in-flight items finish within ``MF_SHUTDOWN_GRACE``, hand back the rest (an item
whose generator call had not started keeps its attempt; one whose call had started may have
been billed, so its reservation is booked and the attempt stays used), close the pool, exit 0.
A second signal exits at once (the items it abandons come back through the reaper when their
leases expire).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import queue
from .cost.budget import Budget
from .cost.notify import build_notifier
from .cost.pricing import PriceTable, load_price_table
from .db import Connection, Pool, open_pool
from .db.migrate import ensure_schema_current
from .engine.events import ClaimLoopTicked, EventHub
from .engine.worker import AttemptReport, InFlight, Outcome, Worker
from .errors import ConfigError, MfWorkerError, describe_error
from .generation import Generator, load_fallback_generator, load_generator
from .logs import get_logger
from .maintenance.budget import BudgetConfig, BudgetLoop
from .maintenance.heartbeat import Heartbeat
from .maintenance.listener import Listener
from .maintenance.loop import PeriodicLoop
from .maintenance.pruner import Pruner, PrunerConfig
from .maintenance.publisher import Publisher, PublisherConfig
from .maintenance.reaper import Reaper, ReaperConfig
from .maintenance.scheduler import Scheduler, SchedulerConfig
from .observability.event_log import EventLog
from .observability.health import HealthServer, ServerNotWritable, check_writable
from .observability.metrics import Metrics
from .observability.queue_depth import read_queue_depth
from .observability.systemd import SystemdNotifier
from .settings import Settings

EXIT_ON_SECOND_SIGNAL = 130


@dataclass
class Components:
    """Everything one daemon runs; tests build it, drive pieces, and look inside."""

    settings: Settings
    pool: Pool
    worker: Worker
    loops: list[PeriodicLoop[Any]]
    listener: Listener | None
    metrics: Metrics
    events: EventHub
    http: HealthServer | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def build(
    settings: Settings,
    *,
    generator: Generator | None = None,
    fallback: Generator | None = None,
    prices: PriceTable | None = None,
    observers: list[Callable[[AttemptReport], None]] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    scheduler: bool = True,
) -> Components:
    """Open the pool, check the schema, and assemble the worker and its loops (not started).
    ``observers`` are subscribed to every attempt's report."""
    generator = generator or load_generator(settings.generator, settings)
    fallback = fallback or load_fallback_generator(settings)
    prices = prices or load_price_table(settings.pricing_file)
    budget = Budget(prices=prices, default_limit=settings.daily_cost_limit_gbp,
                    reserve_per_item=settings.cost_reserve_gbp)
    pool = await open_pool(settings)
    try:
        notifier = build_notifier(settings, pool)
        async with pool.connection() as conn:
            await ensure_schema_current(conn)
    except BaseException:
        await pool.close()
        raise
    events = EventHub()
    metrics = Metrics(concurrency=settings.concurrency)
    metrics.subscribe(events)
    EventLog().subscribe(events)
    publisher = Publisher(pool, PublisherConfig(max_wait=settings.poll_interval), clock=clock,
                          events=events)

    def wake_publisher(report: AttemptReport) -> None:
        # An episode finished early may be due before the publisher's timer: reset it.
        if report.delivery is not None and report.delivery.published_at is None:
            publisher.expect(report.delivery.scheduled_for)

    events.subscribe(AttemptReport, wake_publisher)
    for observer in observers or []:
        events.subscribe(AttemptReport, observer)
    worker = Worker(settings, pool, generator, budget, notifier=notifier, clock=clock,
                    events=events, fallback=fallback)
    worker.flow.listeners.append(events.publish)
    if worker.fallback_flow is not None:
        worker.fallback_flow.listeners.append(events.publish)
    metrics.watch_claims(worker.starved)
    loops: list[PeriodicLoop[Any]] = [
        Heartbeat(worker),
        Reaper(pool, ReaperConfig(lease_seconds=settings.lease_seconds,
                                  max_attempts=settings.max_attempts), events=events),
        Pruner(pool, PrunerConfig(retention_days=settings.retention_days)),
        publisher,
    ]
    if scheduler:
        loops.append(Scheduler(pool, SchedulerConfig(
            interval=settings.scheduler_interval, lead_seconds=settings.lead_seconds,
            sweep_interval=settings.scheduler_sweep_interval), clock=clock, events=events))
        loops.append(BudgetLoop(pool, BudgetConfig(
            policy=settings.cost_limit_policy, default_limit=settings.daily_cost_limit_gbp,
            reserve_per_item=settings.cost_reserve_gbp, interval=settings.scheduler_interval),
            clock=clock, notifier=notifier, events=events))
    listener = Listener(settings, worker.wake) if settings.listen else None
    return Components(settings, pool, worker, loops, listener, metrics, events)


def start_http(components: Components) -> HealthServer | None:
    """Serve /metrics, /healthz and /readyz (unless MF_METRICS_ADDR is empty)."""
    settings = components.settings
    if not settings.metrics_addr:
        return None
    loop = asyncio.get_running_loop()
    pool = components.pool

    async def ready() -> None:
        async def check() -> None:
            async with pool.connection(timeout=2.0) as conn:
                await ensure_schema_current(conn)
                try:
                    await check_writable(conn)
                except ServerNotWritable:
                    # A connection to a read-only server is no use to the engine either:
                    # the pool replaces it (as it does one whose write met such a server).
                    await conn.close()
                    raise

        await asyncio.wait_for(check(), timeout=2.5)

    def queue_depth() -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            async with pool.connection(timeout=2.0) as conn:
                return await read_queue_depth(conn)

        return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=3.0)

    components.metrics.watch_queue(queue_depth)
    worker = components.worker

    def starved() -> tuple[str | None, float, str | None]:
        why, seconds = worker.starved()
        return (why.value if why else None), seconds, worker.starved_detail()

    try:
        server = HealthServer(
            settings.metrics_addr, registry=components.metrics.registry, loop=loop,
            claim_loop_age=components.worker.claim_loop_age,
            stall_seconds=settings.health_stall_seconds, ready_check=ready,
            starved=starved, starved_seconds=settings.health_starved_seconds,
        )
    except OSError as exc:
        raise ConfigError(
            f"MF_METRICS_ADDR={settings.metrics_addr}: cannot listen ({exc.strerror}); "
            "choose another port, 0 for any free one, or empty to disable"
        ) from None
    server.start()
    get_logger("mf_worker.daemon").info("http_listening", port=server.port,
                                        addr=settings.metrics_addr)
    components.http = server
    return server


async def serve(components: Components, *, burst: bool = False,
                install_signals: bool = True) -> int:
    """Run until a signal (or, with ``burst``, until nothing is due); return the exit code."""
    log = get_logger("mf_worker.daemon")
    worker, settings = components.worker, components.settings
    if install_signals:
        _install_signal_handlers(worker)
    for loop in components.loops:
        components.tasks.append(asyncio.create_task(loop.run(), name=loop.name))
    if components.listener is not None:
        components.tasks.append(asyncio.create_task(components.listener.run(), name="listener"))
    if components.http is None:
        start_http(components)
    systemd = systemd_notifier(components)
    log.info("worker_started", worker_id=worker.worker_id, concurrency=settings.concurrency,
             generator=settings.generator, listen=settings.listen)
    systemd.ready(f"claiming as {worker.worker_id}, concurrency {settings.concurrency}")
    try:
        failed: Exception | None = None
        try:
            await worker.run(burst=burst)
        except Exception as exc:  # a bug: still hand back what this process holds first
            log.exception("claim_loop_failed", error=describe_error(exc))
            worker.stop()
            failed = exc
        systemd.stopping("draining in-flight items")
        released = await worker.drain(settings.shutdown_grace)
        log.info("worker_stopped", released=released)
        if failed is not None:
            raise failed
    finally:
        await shutdown(components)
    return 0


def systemd_notifier(components: Components) -> SystemdNotifier:
    """The daemon's link to systemd (a no-op outside a ``Type=notify`` unit).

    ``serve`` sends READY=1 through it once the schema is verified, the HTTP server is up and
    the claim loop is about to start, and STOPPING=1 when the loop ends (signal or burst done).
    With ``WatchdogSec=`` set, WATCHDOG=1 is sent from the claim loop's tick, at most every half
    interval and only while the loop is not stalled (``MF_HEALTH_STALL_SECONDS``) and not
    starved (``MF_HEALTH_STARVED_SECONDS``: room, and nothing claimed that should have been): a
    wedged loop, or one that cannot claim, stops feeding, and systemd restarts the process
    (``WatchdogSignal=SIGTERM`` in the unit: it drains first).
    """
    notifier = SystemdNotifier()
    interval = notifier.watchdog_interval()
    if interval is None:
        return notifier
    worker, stall_seconds = components.worker, components.settings.health_stall_seconds
    starved_seconds = components.settings.health_starved_seconds
    last_fed = -math.inf

    def feed(_tick: ClaimLoopTicked) -> None:
        nonlocal last_fed
        now = time.monotonic()
        if (now - last_fed >= interval / 2 and worker.claim_loop_age() < stall_seconds
                and worker.starved()[1] < starved_seconds):
            last_fed = now
            notifier.watchdog()

    components.events.subscribe(ClaimLoopTicked, feed)
    return notifier


async def shutdown(components: Components) -> None:
    """Stop every loop and the listener, then close the pool (safe to call twice)."""
    for loop in components.loops:
        loop.stop()
    if components.listener is not None:
        components.listener.stop()
    for task in components.tasks:
        task.cancel()
    await asyncio.gather(*components.tasks, return_exceptions=True)
    components.tasks.clear()
    if components.http is not None:
        await asyncio.to_thread(components.http.stop)
        components.http = None
    await components.pool.close()


def _install_signal_handlers(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    log = get_logger("mf_worker.daemon")

    def on_signal(signum: int) -> None:
        if worker.stopping:
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(EXIT_ON_SECOND_SIGNAL)
        log.info("shutdown_requested", signal=signal.Signals(signum).name,
                 in_flight=len(worker.in_flight))
        worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def run_one(components: Components, item_id: str | None = None) -> Outcome | None:
    """``mf-worker run-once``: claim one due item (or the named one, due or not), process it in
    the foreground with its lease kept alive, and return how it ended (None: nothing to do)."""
    worker, settings = components.worker, components.settings
    log = get_logger("mf_worker.run_once")
    async with components.pool.connection() as conn:
        if item_id is None:
            items = await queue.claim_due_items(
                conn, worker=worker.worker_id, limit=1, lease_seconds=settings.lease_seconds
            )
            item = items[0] if items else None
        else:
            item = await queue.claim_item_by_id(
                conn, item_id, worker=worker.worker_id, lease_seconds=settings.lease_seconds
            )
            if item is None:
                raise MfWorkerError(await _unclaimable_reason(conn, item_id))
            if item.run_after > datetime.now(UTC):
                log.warning("item_not_due_yet", queue_id=item.id,
                            due=item.run_after.isoformat())
    if item is None:
        return None
    heartbeat = Heartbeat(worker)
    beat = asyncio.create_task(heartbeat.run(), name="heartbeat")
    entry = InFlight(item=item)
    worker.in_flight[item.token] = entry
    try:
        entry.task = asyncio.create_task(worker.process(entry))
        return await entry.task
    finally:
        worker.in_flight.pop(item.token, None)
        heartbeat.stop()
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)


async def _unclaimable_reason(conn: Connection, item_id: str) -> str:
    row = await queue.get_item(conn, item_id)
    if row is None:
        return f"no queue item {item_id!r}"
    if row["status"] == "processing":
        return f"{item_id} is being processed by {row['locked_by']}"
    return f"{item_id} is {row['status']}, not pending (use `mf-worker retry` first)"
