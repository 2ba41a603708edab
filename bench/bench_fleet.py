"""A fleet on one PostgreSQL: K processes of ``mf-worker run --burst`` draining N due items (#28).

For every organisation count O (``--orgs``, a list) and process count K (``--processes``, a
list), on a fresh database: the package's migrations (``mf-worker migrate``, as a worker
would), N due items over O organisations each with a planning note (bench_engine's seeding:
``reset_and_seed``), a CHECKPOINT; then K real ``mf-worker run --burst`` processes start together
(template generator, ``MF_CONCURRENCY`` = ``--concurrency``, no HTTP server, no lead window)
and the script waits for them to exit. Printed per run:

* **episodes/s**: completed items ÷ the drain (first pick-up to last completion, from the queue
  table: no interpreter start or exit in it); *wall ep/s* divides by first spawn to last exit;
* **speed-up**: episodes/s ÷ the median of the smallest K's runs of the same O and revision;
* **PG CPU ms/ep**: CPU per episode of the whole PostgreSQL cluster (the postmaster and all its
  children from ``/proc/<pid>/stat``, utime + stime, after minus before, plus what the postmaster
  reaped): the WAL writer, checkpointer and background writer included, and also any other
  database's backends (on a shared machine, other people's work); *db ms/ep* counts only the
  backends serving this run's database (bench_engine's ``BackendCpu``);
* **worker CPU ms/ep**: the worker processes' own CPU (``os.wait4``);
* **busy %**: the machine's non-idle CPU time over wall time × cores (``/proc/stat``);
* **wait events**: every 50 ms a thread samples ``pg_stat_activity`` for this database's
  non-idle backends; each sample is a backend's state (``CPU`` when active and waiting on
  nothing, ``Lock:transactionid`` …, ``idle in transaction``) and the named query it runs
  (matched against the package's ``.sql`` files). The top events are printed per run, and the
  share of samples where the final write (``complete_episode``) waited on a heavyweight lock
  (*final-write lock waits*), issue #28's target (< 1 %).

With ``--base REV`` every configuration runs for that git revision too (checked out as in
``compare_revisions.py``, its own ``src`` on ``PYTHONPATH`` for the workers and its own
migrations), interleaved base, head, head, base … for ``--pairs`` pairs, and a last table gives
the head ÷ base ratio of every pair: on a noisy shared VM, compare ratios within one run.

The pool of each worker is capped so that K pools fit in the server's ``max_connections``
with 40 to spare for everybody else (``--pool`` overrides). Figures only: nothing asserts.

    .venv/bin/python bench/bench_fleet.py [--processes 1,2,4,8] [--orgs 50] [--items 6000]
        [--concurrency 32] [--pool N] [--base REV [--pairs 2]] [--timeout 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling scripts whose helpers this one reuses

import bench_engine as be  # noqa: E402
from compare_revisions import WORKTREE, checkout  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.05
SPARE_CONNECTIONS = 40  # left to everybody else on the server
FINAL_WRITE = "complete_episode"


# ---------------------------------------------------------------------------------------------
# The whole cluster's CPU, from /proc
# ---------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def postmaster_pid(url: str) -> int:
    """The postmaster of the server behind ``url``: the parent of one of its backends."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    fields = _stat(int(row[0])) if row else None
    if fields is None:
        raise SystemExit("cannot read the backend's /proc entry: the server must run on this"
                         " machine (Linux) for the CPU figures")
    return int(fields[1])


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds of the cluster so far: every live process of it (utime + stime) and what the
    postmaster reaped (its cutime + cstime: backends that exited)."""
    ticks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        f = _stat(pid)
        if f is None:
            continue
        if pid == postmaster:
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        elif int(f[1]) == postmaster:
            ticks += int(f[11]) + int(f[12])
    return ticks / TICKS


# ---------------------------------------------------------------------------------------------
# Wait events, sampled from pg_stat_activity
# ---------------------------------------------------------------------------------------------


def _shape(text: str) -> str:
    """A query's text reduced so the package's file and the server's copy compare: no comments,
    placeholders (``%(x)s`` in the file, ``$1`` on the server) as ``?``, whitespace collapsed."""
    text = re.sub(r"--[^\n]*", " ", text)
    text = re.sub(r"%\(\w+\)s|\$\d+", "?", text)
    return " ".join(text.split())


def named_queries(tree: Path) -> list[tuple[str, str]]:
    """(shape prefix, name) of every named query in the revision's package, longest first."""
    from mf_worker.db.sql import _COMMENT_LINE, _HEADER

    found = []
    for path in (tree / "src" / "mf_worker").rglob("*.sql"):
        if "migrations" in path.parts or path.name == "schema.sql":
            continue
        parts = _HEADER.split(_COMMENT_LINE.sub("", path.read_text(encoding="utf-8")))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            found.append((_shape(body)[:120], name))
    return sorted(found, key=lambda q: -len(q[0]))


class WaitSampler:
    """Samples this database's non-idle backends every 50 ms in a thread: Counter of
    (event, query name) where event is ``CPU``, ``Type:Event`` or the state."""

    def __init__(self, admin_url: str, dbname: str, queries: list[tuple[str, str]]) -> None:
        self.samples: Counter[tuple[str, str]] = Counter()
        self._admin_url, self._dbname, self._queries = admin_url, dbname, queries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _name(self, text: str) -> str:
        shaped = _shape(text)
        for prefix, name in self._queries:
            if shaped.startswith(prefix) or (len(shaped) >= 100 and prefix.startswith(shaped)):
                return name
        return shaped[:40] or "-"

    def _run(self) -> None:
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
            while not self._stop.wait(SAMPLE_SECONDS):
                for state, event, query in conn.execute(
                    "SELECT state, wait_event_type || ':' || wait_event, query"
                    " FROM pg_stat_activity WHERE datname = %s AND state <> 'idle'"
                    " AND pid <> pg_backend_pid()", [self._dbname]
                ).fetchall():
                    what = (event or "CPU") if state == "active" else state
                    self.samples[(what, self._name(query or ""))] += 1

    def start(self) -> WaitSampler:
        self._thread.start()
        return self

    def stop(self) -> Counter[tuple[str, str]]:
        self._stop.set()
        self._thread.join()
        return self.samples


# ---------------------------------------------------------------------------------------------
# One run: K processes, O organisations, one revision
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    revision: str
    orgs: int
    processes: int
    pool: int
    completed: int = 0
    failed: int = 0
    drain_s: float = float("nan")
    wall_s: float = float("nan")
    pg_cpu_s: float = float("nan")
    db_cpu_s: float | None = None
    worker_cpu_s: float = float("nan")
    busy_s: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    waits: Counter[tuple[str, str]] = field(default_factory=Counter)

    def per_episode_ms(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.completed else seconds / self.completed * 1e3

    @property
    def rate(self) -> float:
        return self.completed / self.drain_s if self.drain_s > 0 else float("nan")

    @property
    def busy_pct(self) -> float | None:
        if self.busy_s is None or not self.wall_s > 0:
            return None
        return 100 * self.busy_s / (self.wall_s * (os.cpu_count() or 1))

    @property
    def final_write_lock_share(self) -> float:
        total = sum(self.waits.values())
        locked = sum(n for (what, name), n in self.waits.items()
                     if name == FINAL_WRITE and what.startswith("Lock:"))
        return locked / total if total else 0.0


def worker_env(url: str, tree: Path, concurrency: int, pool: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.pop("DATABASE_URL", None)
    env.update({
        "MF_DATABASE_URL": url, "MF_CONCURRENCY": str(concurrency),
        "MF_POOL_MAX_SIZE": str(pool), "MF_GENERATOR": "template", "MF_LOG_LEVEL": "warning",
        "MF_LOG_FORMAT": "json", "MF_METRICS_ADDR": "", "MF_LEAD_SECONDS": "0",
        "MF_SCHEDULER_INTERVAL": "3600", "PYTHONPATH": str(tree / "src"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _drain_seconds(url: str) -> tuple[int, int, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed'),"
            " count(*) FILTER (WHERE status = 'failed'),"
            " extract(epoch FROM max(completed_at) - min(picked_up_at))"
            " FROM episode_schedule_queue WHERE id LIKE %s", [be.QUEUE_PREFIX + "%"]).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), float(row[2]) if row[2] is not None else float("nan")


def run_once(admin_url: str, postmaster: int, tree: Path, revision: str, *, orgs: int,
             processes: int, items: int, concurrency: int, pool: int, timeout: float,
             queries: list[tuple[str, str]]) -> Run:
    name = f"mf_bench_fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = be._with_database(admin_url, name)
    run = Run(revision, orgs, processes, pool)
    try:
        env = worker_env(url, tree, concurrency, pool)
        migrated = subprocess.run([sys.executable, "-m", "mf_worker", "migrate"], env=env,
                                  capture_output=True, text=True, check=False)
        if migrated.returncode != 0:
            raise SystemExit(f"mf-worker migrate ({revision}) failed:\n{migrated.stderr[-2000:]}")
        be.ORGS = orgs
        be.reset_and_seed(url, projects=items, items=items, notes=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

        sampler = WaitSampler(admin_url, name, queries).start()
        backends = be.BackendCpu(name).start()
        pg0, busy0 = cluster_cpu(postmaster), be._machine_busy_seconds()
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "mf_worker", "run", "--burst"],
                                  env={**env, "MF_WORKER_ID": f"fleet-{i}"}, cwd=tree,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in range(processes)]
        worker_cpu, stderr_tails = 0.0, []
        for proc in procs:
            left = max(1.0, timeout - (time.perf_counter() - started))
            try:
                _, status, usage = _wait4(proc, left)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                _, status, usage = _wait4(proc, 30)
            proc.returncode = os.waitstatus_to_exitcode(status)
            run.exit_codes.append(proc.returncode)
            worker_cpu += usage.ru_utime + usage.ru_stime
            if proc.returncode != 0 and proc.stderr is not None:
                stderr_tails.append(proc.stderr.read()[-1500:].decode(errors="replace"))
            if proc.stderr is not None:
                proc.stderr.close()
        run.wall_s = time.perf_counter() - started
        busy1 = be._machine_busy_seconds()
        run.pg_cpu_s = cluster_cpu(postmaster) - pg0
        run.db_cpu_s = backends.stop()
        run.waits = sampler.stop()
        run.worker_cpu_s = worker_cpu
        run.busy_s = None if busy0 is None or busy1 is None else busy1 - busy0
        run.completed, run.failed, run.drain_s = _drain_seconds(url)
        for tail in stderr_tails[:2]:
            print(f"  a worker exited non-zero; its last output:\n{tail}", flush=True)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    if run.completed != items:
        print(f"  WARNING: {revision}, K={processes}, O={orgs}: {run.completed:,} of {items:,}"
              f" completed, {run.failed:,} failed", flush=True)
    return run


def _wait4(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, Any]:
    """os.wait4 with a timeout (the rusage is the child's own CPU)."""
    until = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > until:
            raise TimeoutError
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def print_runs(runs: list[Run], top: int) -> None:
    # Speed-up against the median rate of the smallest K of the same revision and O.
    smallest = {(r.revision, r.orgs): min(x.processes for x in runs
                                          if (x.revision, x.orgs) == (r.revision, r.orgs))
                for r in runs}
    base_rate = {key: statistics.median(r.rate for r in runs
                                        if (r.revision, r.orgs) == key and r.processes == k)
                 for key, k in smallest.items()}
    rows = []
    for run in runs:
        rows.append([
            run.revision, str(run.orgs), str(run.processes), str(run.pool),
            f"{run.completed:,}" + ("" if not run.failed else f" ({run.failed} failed)"),
            _fmt(run.drain_s, ".1f"), _fmt(run.rate, ",.0f"),
            _fmt(run.completed / run.wall_s if run.wall_s > 0 else None, ",.0f"),
            _fmt(run.rate / base_rate[(run.revision, run.orgs)], ".2f") + "×",
            _fmt(run.per_episode_ms(run.pg_cpu_s), ".2f"),
            _fmt(run.per_episode_ms(run.db_cpu_s), ".2f"),
            _fmt(run.per_episode_ms(run.worker_cpu_s), ".2f"),
            _fmt(run.busy_pct, ".0f"),
            _fmt(100 * run.final_write_lock_share, ".2f"),
        ])
    be._table(["revision", "orgs", "K", "pool", "completed", "drain s", "episodes/s",
               "wall ep/s", "speed-up", "PG CPU ms/ep", "db ms/ep", "worker CPU ms/ep",
               "busy %", "final-write lock waits %"], rows, right=set(range(1, 14)))
    for run in runs:
        total = sum(run.waits.values()) or 1
        print(f"wait events, {run.revision}, {run.orgs} organisation(s), K={run.processes}"
              f" ({total:,} backend samples; share of samples, event, query):")
        for (what, name), n in run.waits.most_common(top):
            print(f"  {100 * n / total:5.1f} %  {what:<28} {name}")
        print(flush=True)


def print_ratios(runs: list[Run]) -> None:
    print("head ÷ base per interleaved pair (episodes/s: higher is better; PG CPU ms/ep and"
          " final-write lock waits: lower is better)")
    rows = []
    configs = sorted({(r.orgs, r.processes) for r in runs})
    for orgs, k in configs:
        base = [r for r in runs if (r.orgs, r.processes) == (orgs, k) and r.revision == "base"]
        head = [r for r in runs if (r.orgs, r.processes) == (orgs, k) and r.revision == "head"]
        rate = [h.rate / b.rate for h, b in zip(head, base, strict=True)]
        cpu = [(h.pg_cpu_s / max(h.completed, 1)) / (b.pg_cpu_s / max(b.completed, 1))
               for h, b in zip(head, base, strict=True)]
        rows.append([
            str(orgs), str(k), _fmt(statistics.median(r.rate for r in base), ",.0f"),
            _fmt(statistics.median(r.rate for r in head), ",.0f"),
            _fmt(statistics.median(rate), ".2f"), " ".join(f"{x:.2f}" for x in rate),
            _fmt(statistics.median(cpu), ".2f"),
            _fmt(100 * statistics.median(r.final_write_lock_share for r in base), ".2f"),
            _fmt(100 * statistics.median(r.final_write_lock_share for r in head), ".2f"),
        ])
    be._table(["orgs", "K", "base ep/s", "head ep/s", "ratio", "per pair", "PG CPU ratio",
               "base lock %", "head lock %"], rows, right={0, 1, 2, 3, 4, 6, 7, 8})


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.replace(",", " ").split()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a list of positive integers, e.g. 1,2,4,8")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--processes", type=_ints, default=[1, 2, 4, 8],
                        help="process counts K, ascending (default 1,2,4,8)")
    parser.add_argument("--orgs", type=_ints, default=[50],
                        help="organisation counts O (default 50; 1,50 compares one with fifty)")
    parser.add_argument("--items", type=int, default=6000, help="due items per run")
    parser.add_argument("--concurrency", type=int, default=32, help="MF_CONCURRENCY per process")
    parser.add_argument("--pool", type=int, default=None,
                        help="MF_POOL_MAX_SIZE per process (default: fits max_connections)")
    parser.add_argument("--base", default=None,
                        help="git revision to interleave with the working tree (--head)")
    parser.add_argument("--head", default=WORKTREE, help="revision measured (default: the"
                        " working tree)")
    parser.add_argument("--pairs", type=int, default=2, help="with --base: interleaved pairs")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a run's workers may take before they are killed")
    parser.add_argument("--top", type=int, default=6, help="wait events printed per run")
    parser.add_argument("--json", action="store_true", help="also one JSON line per run")
    args = parser.parse_args(argv)
    if args.items < 1 or args.concurrency < 1 or args.pairs < 1:
        parser.error("--items, --concurrency and --pairs must be positive")
    admin_url = os.environ.get("MF_BENCH_DATABASE_URL", "postgresql:///postgres")
    postmaster = postmaster_pid(admin_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        version = conn.info.server_version
        limit = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
    print(f"PostgreSQL {version // 10000}.{version % 10000}, {os.cpu_count()} CPU(s), Python"
          f" {sys.version.split()[0]}; {args.items:,} due items with a planning note each,"
          f" template generator, MF_CONCURRENCY={args.concurrency}, max_connections {limit}",
          flush=True)

    runs: list[Run] = []
    sides = ["head"] if args.base is None else ["base", "head"]
    with checkout(args.base or WORKTREE) as base_tree, checkout(args.head) as head_tree:
        trees = {"base": base_tree, "head": head_tree}
        queries = {side: named_queries(trees[side]) for side in sides}
        for orgs in args.orgs:
            for k in args.processes:
                pool = args.pool or max(2, min(20, (limit - SPARE_CONNECTIONS) // k))
                for pair in range(args.pairs if args.base else 1):
                    order = sides if pair % 2 == 0 else sides[::-1]
                    for side in order:
                        run = run_once(admin_url, postmaster, trees[side], side, orgs=orgs,
                                       processes=k, items=args.items,
                                       concurrency=args.concurrency, pool=pool,
                                       timeout=args.timeout, queries=queries[side])
                        runs.append(run)
                        print(f"{side}: O={orgs} K={k}: {run.rate:,.0f} episodes/s, PG"
                              f" {_fmt(run.per_episode_ms(run.pg_cpu_s), '.2f')} ms/ep,"
                              f" final-write lock waits"
                              f" {100 * run.final_write_lock_share:.2f} %", flush=True)
                        if args.json:
                            print(json.dumps({**{k2: v for k2, v in vars(run).items()
                                                 if k2 != "waits"},
                                              "waits": {f"{w}|{q}": n for (w, q), n
                                                        in run.waits.items()}}), flush=True)
    print()
    print_runs(runs, args.top)
    if args.base is not None:
        print_ratios(runs)
    return 0 if all(r.failed == 0 and set(r.exit_codes) == {0} for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
