"""Benchmark of the engine on a real PostgreSQL server: the queue, the pipeline, wake-up, I/O.

Four sections, each printed as a table with its target beside the measured figure:

* **queue**: the queue machinery alone. N due items (default 20,000), drained in one asyncio
  process by ``claim_due_items`` + ``complete_items`` called directly (no episode is written),
  with batch sizes 1, 10 and 100 on one connection and batch 100 on 4 concurrent connections.
  Target: ≥ 6,000 items/s (batch 100).
* **pipeline**: the whole pipeline with the built-in ``template`` generator. N due items
  (default 3,000), each with a planning note, processed by ``build()`` + ``serve(burst=True)``
  at concurrency 8 and 32. Episodes/s = completed items / wall time of ``serve``. Target: ≥ 500.
* **latency**: idle pickup latency. A worker runs ``serve()`` (not burst) in this process with a
  5 s poll interval, so only LISTEN/NOTIFY can explain a fast pickup; another connection commits
  one due item at a time. Latency = from just before the INSERT's COMMIT to the moment the
  worker's claim returns that item (``Worker._claim`` is wrapped on the instance; same process,
  so ``perf_counter`` is comparable). 100 trials (after 5 warm-up ones), ~20 ms apart.
  Target: p50 ≤ 5 ms, p99 ≤ 25 ms. Also shown for comparison: LISTEN off, 50 ms polling.
* **concurrency**: I/O concurrency. A generator that sleeps 0.2 s and then writes the template
  episode; for concurrency 1, 4, 16, 64, 256, enough items for ≥ 3 s at the ideal rate
  (concurrency / 0.2 s). Each level runs in a fresh subprocess (this script with ``--level``) so
  its peak RSS (VmHWM) is its own. Target: ≥ 80 % of the ideal rate, peak RSS ≤ 150 MB at 256.

Every figure is the median of ``--runs`` runs, each on freshly seeded data. The script creates a
throwaway database ``mf_bench_engine_<random>`` on the server named by ``MF_BENCH_DATABASE_URL``
(a maintenance database URL; default ``postgresql:///postgres``), migrates it and drops it at
the end, even on error. Figures only: nothing here asserts on time, which depends on the machine.

    .venv/bin/python bench/bench_engine.py [--runs 3] [--only queue|pipeline|latency|concurrency]
                                           [--items N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mf_worker.daemon import build, serve
from mf_worker.db import connect
from mf_worker.db.migrate import apply_migrations
from mf_worker.engine.worker import AttemptReport, Outcome
from mf_worker.generation import GenerationRequest, GenerationResult, load_generator
from mf_worker.generators.template import TemplateGenerator
from mf_worker.logs import configure_logging
from mf_worker.queue import ClaimedItem, claim_due_items, complete_items
from mf_worker.settings import Settings, load_settings

SECTIONS = ("queue", "pipeline", "latency", "concurrency")
ORGS = 50
QUEUE_PREFIX = "benchq_"  # seeded items; the items a worker schedules next have other ids
LEASE_SECONDS = 60.0

QUEUE_CONFIGS = [(1, 1), (10, 1), (100, 1), (100, 4)]  # (batch size, connections)
QUEUE_TARGET = 6_000.0
PIPELINE_CONCURRENCY = [8, 32]
PIPELINE_TARGET = 500.0
LATENCY_TRIALS = 100
LATENCY_WARMUP = 5
LATENCY_GAP = 0.02
LATENCY_P50_TARGET_MS = 5.0
LATENCY_P99_TARGET_MS = 25.0
SLEEP_SECONDS = 0.2
CONCURRENCY_LEVELS = [1, 4, 16, 64, 256]
CONCURRENCY_SECONDS = 3.0
CONCURRENCY_RATIO_TARGET = 0.80
RSS_TARGET_MB = 150.0


# ---------------------------------------------------------------------------------------------
# The database: a throwaway one, reset and seeded before every run
# ---------------------------------------------------------------------------------------------


def _with_database(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


@contextmanager
def bench_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A freshly created and migrated database, dropped on the way out whatever happens."""
    name = f"mf_bench_engine_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = admin.info.server_version
    url = _with_database(admin_url, name)
    try:
        asyncio.run(_migrate(url))
        yield url, f"PostgreSQL {version // 10000}.{version % 10000}, database {name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def _migrate(url: str) -> None:
    conn = await connect(_settings(url))
    async with conn:
        await apply_migrations(conn)


# Settings the benchmark turns off when this version of the engine has them: the HTTP server
# for /metrics and /healthz would bind a fixed port (and runs fail when that port is taken).
_OFF_IF_PRESENT = {"metrics_addr": ""}


def _settings(url: str, **overrides: Any) -> Settings:
    known = {f.name for f in dataclasses.fields(Settings)}
    settings, _ = load_settings(
        environ={},
        overrides={
            **{k: v for k, v in _OFF_IF_PRESENT.items() if k in known},
            "database_url": url,
            "log_level": "warning",
            "lease_seconds": LEASE_SECONDS,
            **overrides,
        },
    )
    return settings


SEED_TENANTS = [
    """
    INSERT INTO organizations (id, name)
    SELECT 'org_b' || o, 'Bench org ' || o FROM generate_series(1, %(orgs)s) o
    """,
    """
    INSERT INTO users (id, organization_id, email, timezone)
    SELECT 'usr_b' || o, 'org_b' || o, 'bench' || o || '@example.com',
           (ARRAY['UTC', 'Europe/London', 'America/New_York', 'Asia/Tokyo'])[1 + o %% 4]
    FROM generate_series(1, %(orgs)s) o
    """,
    """
    INSERT INTO projects (id, organization_id, user_id, title, description, cadence_config)
    SELECT 'prj_b' || g, 'org_b' || (1 + g %% %(orgs)s), 'usr_b' || (1 + g %% %(orgs)s),
           'Bench project ' || g,
           'Tracking shipping prices, harbour strikes and fuel markets for project ' || g,
           '{"mode": "daily", "days": []}'
    FROM generate_series(1, %(projects)s) g
    """,
]
SEED_NOTES = """
    INSERT INTO planning_notes (id, project_id, organization_id, user_id, note)
    SELECT 'note_b' || g, 'prj_b' || g, 'org_b' || (1 + g %% %(orgs)s),
           'usr_b' || (1 + g %% %(orgs)s), 'Please cover the harbour strike in episode ' || g
    FROM generate_series(1, %(items)s) g
"""
SEED_ITEMS = """
    INSERT INTO episode_schedule_queue (id, project_id, organization_id, scheduled_for)
    SELECT %(prefix)s || lpad(g::text, 7, '0'), 'prj_b' || g, 'org_b' || (1 + g %% %(orgs)s),
           now() - interval '1 minute'
    FROM generate_series(1, %(items)s) g
"""


def reset_and_seed(url: str, *, projects: int, items: int, notes: bool) -> None:
    """Empty every table, then ``projects`` projects in ORGS organisations, the first ``items``
    of them with one due pending item (and one planning note when ``notes``)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'mf_schema_migrations'"
            ).fetchall()
        ]
        conn.execute(
            sql.SQL("TRUNCATE {} CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in tables)
            )
        )
        params = {"orgs": ORGS, "projects": projects, "items": items, "prefix": QUEUE_PREFIX}
        for statement in SEED_TENANTS:
            conn.execute(statement, params)
        if notes and items:
            conn.execute(SEED_NOTES, params)
        if items:
            conn.execute(SEED_ITEMS, params)
        conn.execute(
            "VACUUM ANALYZE organizations, users, projects, planning_notes, episode_schedule_queue"
        )


def count_seeded(url: str, status: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM episode_schedule_queue WHERE status = %s AND id LIKE %s",
            [status, QUEUE_PREFIX + "%"],
        ).fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print(flush=True)


def _runs(values: list[float], fmt: str = "{:,.0f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


# ---------------------------------------------------------------------------------------------
# 1. The queue machinery alone
# ---------------------------------------------------------------------------------------------


async def _drain_queue(url: str, batch: int, connections: int) -> tuple[int, float]:
    settings = _settings(url)
    conns = [await connect(settings) for _ in range(connections)]

    async def drain(conn: Any, worker: str) -> int:
        done = 0
        while True:
            items: list[ClaimedItem] = await claim_due_items(
                conn, worker=worker, limit=batch, lease_seconds=LEASE_SECONDS
            )
            if not items:
                return done
            done += len(await complete_items(conn, items))

    try:
        started = time.perf_counter()
        counts = await asyncio.gather(*(drain(c, f"bench-queue-{i}") for i, c in enumerate(conns)))
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()
    return sum(counts), elapsed


def section_queue(url: str, items: int, runs: int) -> None:
    print(
        f"1. Queue machinery alone: claim_due_items + complete_items, {items:,} due items,"
        f" one process, median of {runs} run(s)",
        flush=True,
    )
    rows = []
    for batch, connections in QUEUE_CONFIGS:
        rates = []
        for _ in range(runs):
            reset_and_seed(url, projects=items, items=items, notes=False)
            done, elapsed = asyncio.run(_drain_queue(url, batch, connections))
            if done != items:
                print(f"WARNING: batch {batch} × {connections}: completed {done:,} of {items:,}")
            rates.append(done / elapsed)
        median = statistics.median(rates)
        target = batch >= 100
        rows.append(
            [
                f"batch {batch}, {connections} connection{'s' if connections > 1 else ''}",
                f"{median:,.0f}",
                f"≥ {QUEUE_TARGET:,.0f}" if target else "(reference)",
                _verdict(median >= QUEUE_TARGET) if target else "",
                _runs(rates),
            ]
        )
    _table(["config", "items/s", "target", "", "runs"], rows, right={1})


# ---------------------------------------------------------------------------------------------
# 2. The full pipeline with the template generator
# ---------------------------------------------------------------------------------------------


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have been busy (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / ticks  # all but idle and iowait


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BackendCpu:
    """CPU seconds spent by the PostgreSQL backends serving one database, sampled from /proc
    every ``interval`` seconds in a thread: each backend whose command line names the database
    counts from its first sample (0 if it started during the run) to its last. Unlike *other
    CPU*, it leaves out everything else on the machine (other databases' backends, other
    programs); it misses at most the last interval of a backend that exits during the run.
    Linux only (None elsewhere)."""

    def __init__(self, dbname: str, interval: float = 0.05) -> None:
        self._tag = f" {dbname} ".encode()
        self._interval = interval
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._others: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _sample(self, starting: bool) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self._others:
                continue
            pid = int(name)
            try:
                if pid not in self._last:  # read each process's command line once
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ") + b" "
                    if not cmdline.startswith(b"postgres:") or self._tag not in cmdline:
                        self._others.add(pid)
                        continue
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime
            self._first.setdefault(pid, cpu if starting else 0.0)
            self._last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample(starting=False)

    def start(self) -> BackendCpu:
        if sys.platform.startswith("linux"):
            self._sample(starting=True)
            self._thread.start()
        return self

    def stop(self) -> float | None:
        if not self._thread.is_alive():
            return None
        self._stop.set()
        self._thread.join()
        self._sample(starting=False)
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


@dataclasses.dataclass
class BurstRun:
    """One ``serve(burst=True)``: wall seconds, the median seconds a successful item spent
    outside its generator, the CPU the worker process and the rest of the machine (the
    database, mostly) spent meanwhile, and the steady completion rate."""

    seconds: float
    item_outside: float
    worker_cpu: float
    other_cpu: float | None
    steady_rate: float
    postgres_cpu: float | None = None


def steady_rate(completed_at: list[float]) -> float:
    """Completions per second between the 10th and the 90th percentile completion, which
    leaves out the ramp (the first items wait for a whole generation) and the tail (the last
    items finish while slots are emptying): the rate the worker sustains."""
    times = sorted(completed_at)
    first, last = len(times) // 10, len(times) * 9 // 10
    if last - first < 2 or times[last] <= times[first]:
        return math.nan
    return (last - first) / (times[last] - times[first])


async def _serve_burst(url: str, concurrency: int, generator: Any) -> BurstRun:
    settings = _settings(url, concurrency=concurrency, poll_interval=1.0)
    outside: list[float] = []
    completed_at: list[float] = []

    def observer(report: AttemptReport) -> None:
        if report.outcome is Outcome.SUCCESS:
            outside.append(report.item_seconds - (report.generation_seconds or 0.0))
            completed_at.append(time.perf_counter())

    components = await build(settings, generator=generator, observers=[observer], scheduler=False)
    backends = BackendCpu(str(conninfo_to_dict(url)["dbname"])).start()
    busy, own = _machine_busy_seconds(), _own_cpu_seconds()
    started = time.perf_counter()
    await serve(components, burst=True, install_signals=False)
    elapsed = time.perf_counter() - started
    worker_cpu = _own_cpu_seconds() - own
    busy_after = _machine_busy_seconds()
    postgres_cpu = backends.stop()
    other = None if busy is None or busy_after is None else busy_after - busy - worker_cpu
    return BurstRun(elapsed, statistics.median(outside) if outside else math.nan,
                    worker_cpu, other, steady_rate(completed_at), postgres_cpu)


def section_pipeline(url: str, items: int, runs: int) -> None:
    print(
        f"2. Full pipeline, template generator: build() + serve(burst=True), {items:,} due"
        f" items with a planning note each, median of {runs} run(s)",
        flush=True,
    )
    rows = []
    for concurrency in PIPELINE_CONCURRENCY:
        rates, outside, worker_ms, other_ms, pg_ms = [], [], [], [], []
        for _ in range(runs):
            reset_and_seed(url, projects=items, items=items, notes=True)
            run = asyncio.run(_serve_burst(url, concurrency, load_generator("template")))
            outside.append(run.item_outside * 1000)
            completed = count_seeded(url, "completed")
            if completed != items:
                print(
                    f"WARNING: concurrency {concurrency}: only {completed:,} of {items:,}"
                    " items completed"
                )
            rates.append(completed / run.seconds)
            worker_ms.append(run.worker_cpu / max(completed, 1) * 1000)
            if run.other_cpu is not None:
                other_ms.append(run.other_cpu / max(completed, 1) * 1000)
            if run.postgres_cpu is not None:
                pg_ms.append(run.postgres_cpu / max(completed, 1) * 1000)
        median = statistics.median(rates)
        rows.append(
            [
                f"concurrency {concurrency}",
                f"{median:,.0f}",
                f"≥ {PIPELINE_TARGET:,.0f}",
                _verdict(median >= PIPELINE_TARGET),
                f"{statistics.median(outside):.1f}",
                f"{statistics.median(worker_ms):.2f}",
                f"{statistics.median(other_ms):.2f}" if other_ms else "n/a",
                f"{statistics.median(pg_ms):.2f}" if pg_ms else "n/a",
                _runs(rates),
            ]
        )
    _table(
        ["config", "episodes/s", "target", "", "item ms", "worker CPU ms", "other CPU ms",
         "PG CPU ms", "runs"],
        rows,
        right={1, 4, 5, 6, 7},
    )
    print(
        "item ms: median time one item spends in the worker (prepare + write transactions,"
        " waits for a pooled connection; the template generator itself takes ~0)\n"
        "worker / other CPU ms: CPU per episode of the worker process, and of everything else"
        " on the machine meanwhile (PostgreSQL, mostly). Their sum over the cores is the"
        " ceiling: 2 cores ÷ (worker + other) episodes/s at best\n"
        "PG CPU ms: CPU per episode of the PostgreSQL backends serving this benchmark's"
        " database only (sampled from /proc; other CPU also counts every other program and"
        " database on the machine). Target ≤ 2.0 ms (#16)\n"
    )


# ---------------------------------------------------------------------------------------------
# 3. Idle pickup latency
# ---------------------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _latency_run(url: str, *, listen: bool, poll_interval: float) -> list[float]:
    """Seconds from just before each COMMIT to the claim that returned the item."""
    settings = _settings(url, concurrency=4, poll_interval=poll_interval, listen=listen)
    processed: dict[str, asyncio.Event] = {}
    claimed_at: dict[str, float] = {}

    def observer(report: AttemptReport) -> None:
        if report.outcome is not Outcome.SUCCESS:
            print(f"WARNING: item {report.item.id} ended {report.outcome.value}: {report.error}")
        event = processed.get(report.item.id)
        if event is not None:
            event.set()

    components = await build(
        settings, generator=load_generator("template"), observers=[observer], scheduler=False
    )
    worker = components.worker
    claim = worker._claim

    async def timed_claim(limit: int) -> list[ClaimedItem]:
        items = await claim(limit)
        if items:
            now = time.perf_counter()
            for item in items:
                claimed_at.setdefault(item.id, now)
        return items

    worker._claim = timed_claim  # type: ignore[method-assign]
    serving = asyncio.create_task(serve(components, burst=False, install_signals=False))
    latencies: list[float] = []
    try:
        if components.listener is not None:
            await asyncio.wait_for(components.listener.connected.wait(), timeout=10)
        await asyncio.sleep(0.2)  # the start-up claim and wake-up are over: the worker is idle
        insert = await psycopg.AsyncConnection.connect(url)
        async with insert:
            for trial in range(LATENCY_WARMUP + LATENCY_TRIALS):
                item_id = f"benchl_{trial:05d}"
                processed[item_id] = asyncio.Event()
                await insert.execute(
                    "INSERT INTO episode_schedule_queue"
                    " (id, project_id, organization_id, scheduled_for)"
                    " VALUES (%s, %s, %s, now() - interval '1 second')",
                    [item_id, f"prj_b{trial + 1}", f"org_b{1 + (trial + 1) % ORGS}"],
                )
                before_commit = time.perf_counter()
                await insert.commit()
                await asyncio.wait_for(processed[item_id].wait(), timeout=30)
                if trial >= LATENCY_WARMUP:
                    latencies.append(claimed_at[item_id] - before_commit)
                await asyncio.sleep(LATENCY_GAP)  # idle again before the next one
    finally:
        worker.stop()
        await serving
    return latencies


def section_latency(url: str, runs: int) -> None:
    print(
        f"3. Idle pickup latency: COMMIT of one due item → claim returns it, "
        f"{LATENCY_TRIALS} trials per run ({LATENCY_WARMUP} warm-up trials not counted),"
        f" median of {runs} run(s)",
        flush=True,
    )
    modes = [("LISTEN on, poll 5 s", True, 5.0), ("LISTEN off, poll 0.05 s", False, 0.05)]
    rows = []
    for label, listen, poll in modes:
        per_run: list[dict[str, float]] = []
        for _ in range(runs):
            reset_and_seed(url, projects=LATENCY_WARMUP + LATENCY_TRIALS, items=0, notes=False)
            values = sorted(asyncio.run(_latency_run(url, listen=listen, poll_interval=poll)))
            per_run.append(
                {
                    "p50": _percentile(values, 50) * 1000,
                    "p90": _percentile(values, 90) * 1000,
                    "p99": _percentile(values, 99) * 1000,
                    "max": values[-1] * 1000,
                }
            )
        fig = {k: statistics.median(r[k] for r in per_run) for k in ("p50", "p90", "p99", "max")}
        if listen:
            ok = fig["p50"] <= LATENCY_P50_TARGET_MS and fig["p99"] <= LATENCY_P99_TARGET_MS
            target = f"p50 ≤ {LATENCY_P50_TARGET_MS:g}, p99 ≤ {LATENCY_P99_TARGET_MS:g}"
            verdict = _verdict(ok)
        else:
            target, verdict = "(comparison)", ""
        rows.append(
            [
                label,
                *(f"{fig[k]:.2f}" for k in ("p50", "p90", "p99", "max")),
                target,
                verdict,
                _runs([r["p50"] for r in per_run], "{:.2f}"),
            ]
        )
    _table(
        ["mode", "p50 ms", "p90 ms", "p99 ms", "max ms", "target ms", "", "p50 of runs"],
        rows,
        right={1, 2, 3, 4},
    )


# ---------------------------------------------------------------------------------------------
# 4. I/O concurrency
# ---------------------------------------------------------------------------------------------


class SleepingTemplateGenerator:
    """Waits like a remote model call (``asyncio.sleep``), then writes the template episode."""

    def __init__(self, delay: float = SLEEP_SECONDS) -> None:
        self.delay = delay
        self._template = TemplateGenerator()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await asyncio.sleep(self.delay)
        return self._template.write(request)


def _items_for(concurrency: int) -> int:
    return max(20, round(concurrency / SLEEP_SECONDS * CONCURRENCY_SECONDS))


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_level(url: str, concurrency: int, runs: int) -> dict[str, Any]:
    """One concurrency level, ``runs`` times (this process's peak RSS covers all of them)."""
    items = _items_for(concurrency)
    rates, incomplete, outside, steady = [], [], [], []
    for _ in range(runs):
        reset_and_seed(url, projects=items, items=items, notes=True)
        run = asyncio.run(_serve_burst(url, concurrency, SleepingTemplateGenerator()))
        outside.append(run.item_outside)
        steady.append(run.steady_rate)
        completed = count_seeded(url, "completed")
        if completed != items:
            incomplete.append(completed)
        rates.append(completed / run.seconds)
    return {
        "concurrency": concurrency,
        "items": items,
        "rates": rates,
        "steady_rates": steady,
        "outside_generator_seconds": outside,
        "incomplete": incomplete,
        "peak_rss_mb": _peak_rss_mb(),
    }


def section_concurrency(url: str, runs: int) -> None:
    print(
        f"4. I/O concurrency: generator sleeps {SLEEP_SECONDS:g} s then writes the template"
        f" episode; ≥ {CONCURRENCY_SECONDS:g} s of work per run, one fresh process per level,"
        f" median of {runs} run(s)",
        flush=True,
    )
    rows = []
    for concurrency in CONCURRENCY_LEVELS:
        proc = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--only",
                "concurrency",
                "--level",
                str(concurrency),
                "--runs",
                str(runs),
                "--json",
                "--orgs",
                str(ORGS),
                "--database-url",
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise RuntimeError(f"concurrency level {concurrency} failed ({proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        for completed in result["incomplete"]:
            print(
                f"WARNING: concurrency {concurrency}: only {completed:,} of"
                f" {result['items']:,} items completed"
            )
        ideal = concurrency / SLEEP_SECONDS
        median = statistics.median(result["rates"])
        ratio = median / ideal
        rss = result["peak_rss_mb"]
        ok = ratio >= CONCURRENCY_RATIO_TARGET and (concurrency < 256 or rss <= RSS_TARGET_MB)
        rows.append(
            [
                f"{concurrency}",
                f"{result['items']:,}",
                f"{median:,.1f}",
                f"{ideal:,.0f}",
                f"{ratio:.0%}",
                f"{statistics.median(result['steady_rates']) / ideal:.0%}",
                f"{rss:.0f}",
                f"{statistics.median(result['outside_generator_seconds']) * 1000:.1f}",
                f"≥ {CONCURRENCY_RATIO_TARGET:.0%}"
                + (f", ≤ {RSS_TARGET_MB:.0f} MB" if concurrency == 256 else ""),
                _verdict(ok),
                _runs(result["rates"], "{:,.1f}"),
            ]
        )
    _table(
        [
            "concurrency",
            "items",
            "items/s",
            "ideal/s",
            "ratio",
            "steady",
            "peak RSS MB",
            "item ms",
            "target",
            "",
            "runs",
        ],
        rows,
        right={0, 1, 2, 3, 4, 5, 6, 7},
    )
    print(
        "ratio: items/s over the whole run ÷ ideal (the verdict); steady: the completion rate"
        " between the 10th and 90th percentile completions ÷ ideal, without the ramp and the"
        " tail\nitem ms: median time one item spends in the worker outside the generator"
        " (prepare + write transactions, waits for a pooled connection); the ratio needs it"
        " ≤ 50 ms\n"
    )


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global ORGS  # --orgs: read by the seeding and the latency trials
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median; ≥ 1)")
    parser.add_argument("--only", choices=SECTIONS, help="run one section")
    parser.add_argument(
        "--items",
        type=int,
        default=None,
        help="items for the queue (default 20000) and pipeline (3000) sections",
    )
    parser.add_argument(
        "--orgs",
        type=int,
        default=ORGS,
        help=f"organisations the seeded projects are spread over (default {ORGS}); 1 puts"
        " every item on one organisation's aggregate row",
    )
    parser.add_argument(
        "--level", type=int, default=None, help="with --only concurrency: run one concurrency level"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --level: print the level's raw figures as one JSON line",
    )
    parser.add_argument("--database-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.orgs < 1 or (args.items is not None and args.items < 1):
        parser.error("--runs, --orgs and --items must be positive")
    ORGS = args.orgs
    if args.level is not None and (args.only != "concurrency" or args.level < 1):
        parser.error("--level needs --only concurrency and a positive level")

    configure_logging("console", "warning")  # per-item info lines would swamp the tables
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")

    if args.level is not None:

        def level(url: str) -> None:
            result = run_level(url, args.level, args.runs)
            if args.json:
                print(json.dumps(result))
            else:
                print(result)

        if args.database_url:
            level(args.database_url)
        else:
            with bench_database(admin_url) as (url, _):
                level(url)
        return 0

    sections = [args.only] if args.only else list(SECTIONS)
    started = time.perf_counter()
    with bench_database(admin_url) as (url, description):
        print(
            f"{description}, {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}\n", flush=True
        )
        for section in sections:
            if section == "queue":
                section_queue(url, args.items or 20_000, args.runs)
            elif section == "pipeline":
                section_pipeline(url, args.items or 3_000, args.runs)
            elif section == "latency":
                section_latency(url, args.runs)
            else:
                section_concurrency(url, args.runs)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
