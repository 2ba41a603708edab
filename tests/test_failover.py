"""A PostgreSQL failover that passes through a read-only server (#24 item 10).

A real primary and a streaming standby run on free ports of this machine (``initdb`` and
``pg_basebackup`` as the ``postgres`` OS user when the tests run as root). The workers reach the
database through a small TCP proxy, standing in for a DNS name or a load balancer that flips to
the standby *before* it is promoted: for a few seconds every connection reaches a read-only
server. The daemons must wait that out (no exit), report not ready, and claim again within
seconds of the promotion; every item is completed exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from .conftest import REQUIRE_ALL
from .test_engine_processes import seed_many
from .workers import ROOT, http_get, port_of, start_worker, wait_until, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ITEMS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_postgres(command: list[str]) -> list[str]:
    """initdb, pg_ctl and pg_basebackup refuse to run as root: run them as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _pg(tool: str, *args: str, timeout: float = 60) -> None:
    subprocess.run(_as_postgres([str(PG_BIN / tool), *args]), check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Cluster:
    """A primary and its streaming standby, in one temporary directory."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mf-failover-"))
        self.primary, self.standby = self.home / "primary", self.home / "standby"
        self.primary_port, self.standby_port = _free_port(), _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres", "postgres")

    def start(self) -> None:
        _pg("initdb", "-D", str(self.primary), "--auth=trust", "--no-sync", "-U", "postgres")
        with (self.primary / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.primary_port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.home}'\nfsync = off\n"
                       "wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n"
                       "max_connections = 100\n")
        self._start(self.primary)
        _pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
            "-D", str(self.standby), "-R", "-X", "stream", "--no-sync")
        with (self.standby / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.standby_port}\n")
        self._start(self.standby)

    def _start(self, data: Path) -> None:
        _pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "start")

    def url(self, port: int, dbname: str = "postgres") -> str:
        return make_conninfo("", host="127.0.0.1", port=port, user="postgres", dbname=dbname)

    def kill_primary(self) -> None:
        _pg("pg_ctl", "-D", str(self.primary), "-m", "immediate", "stop")

    def promote_standby(self) -> None:
        _pg("pg_ctl", "-D", str(self.standby), "-w", "promote")

    def stop(self) -> None:
        for data in (self.primary, self.standby):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.SubprocessError):
                    _pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(self.home, ignore_errors=True)


class FlippingProxy:
    """A TCP proxy on 127.0.0.1 in a thread of its own: every new connection goes to the current
    target; `flip` changes the target and cuts every open connection (as a dead server does)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = _free_port()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flipping-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)
        self._writers -= {writer, up_writer}

    def flip(self, target: int) -> None:
        def switch() -> None:
            self.target = target
            for w in list(self._writers):
                w.close()

        self._loop.call_soon_threadsafe(switch)

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not (PG_BIN / "pg_basebackup").exists():
        message = f"PostgreSQL 15 server binaries not found in {PG_BIN}"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    pair = Cluster()
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


def _scalar(url: str, sql: str) -> Any:
    with psycopg.connect(url, connect_timeout=5, row_factory=dict_row) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return next(iter(row.values()))


def _says_read_only(answer: tuple[int, str]) -> bool:
    status, body = answer
    return status == 503 and "read-only" in json.loads(body).get("error", "")


def test_a_failover_through_a_read_only_standby_loses_nothing_and_ends_no_worker(
    cluster: Cluster, tmp_path: Path,
) -> None:
    """300 items, two workers behind a proxy. At a third done the primary is killed and the
    proxy sends every connection to the standby, still read-only; it is promoted 4 s later.
    Meanwhile the workers stay up and /readyz answers 503; after the promotion they claim again
    within seconds, every item is completed once (one episode per project), and both exit 0 at
    SIGTERM."""
    admin = cluster.url(cluster.primary_port)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE mf")
    primary, standby = (cluster.url(cluster.primary_port, "mf"),
                        cluster.url(cluster.standby_port, "mf"))
    migrated = subprocess.run([sys.executable, "-m", "mf_worker", "migrate"],
                              env=worker_env(primary), cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(primary, autocommit=True, row_factory=dict_row) as seeder:
        seed_many(seeder, orgs=6, items=ITEMS, title="slow:0.2")
    proxy = FlippingProxy(cluster.primary_port)
    via = cluster.url(proxy.port, "mf")
    env = {"MF_CONCURRENCY": "4", "MF_POLL_INTERVAL": "0.2", "MF_LEASE_SECONDS": "60"}
    workers = [start_worker(via, log=tmp_path / f"w{i}.log", MF_WORKER_ID=f"w{i}", **env)
               for i in range(2)]
    completed = "SELECT count(*) FROM episode_schedule_queue WHERE status = 'completed'"
    try:
        readyz = f"http://127.0.0.1:{port_of(tmp_path / 'w0.log')}/readyz"
        wait_until(lambda: _scalar(primary, completed) >= ITEMS // 3, 120, "a third done")
        cluster.kill_primary()
        proxy.flip(cluster.standby_port)

        def read_only_and_running() -> bool:
            exited = [i for i, w in enumerate(workers) if w.poll() is not None]
            assert not exited, (f"worker {exited[0]} exited on the read-only server: "
                                + (tmp_path / f"w{exited[0]}.log").read_text()[-1500:])
            return _says_read_only(http_get(readyz))

        wait_until(read_only_and_running, 10, "/readyz to say the server is read-only")
        time.sleep(4.0)  # the read-only window: claims and writes meet a standby
        alive_before_promotion = [w.poll() is None for w in workers]
        cluster.promote_standby()
        promoted_at = _scalar(standby, "SELECT now()")
        wait_until(lambda: _scalar(standby, completed) == ITEMS, 120, "every item done")
        wait_until(lambda: http_get(readyz)[0] == 200, 20, "/readyz after the promotion")
        alive = [w.poll() is None for w in workers]
        resumed = _scalar(standby, f"""
            SELECT extract(epoch FROM min(last_attempt_at) - '{promoted_at}'::timestamptz)
            FROM episode_schedule_queue WHERE last_attempt_at > '{promoted_at}'""")
        first_done = _scalar(standby, f"""
            SELECT extract(epoch FROM min(completed_at) - '{promoted_at}'::timestamptz)
            FROM episode_schedule_queue WHERE completed_at > '{promoted_at}'""")
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=60) for w in workers]
        proxy.close()
    print(f"claims resumed {float(resumed):.2f} s and the first completion came "
          f"{float(first_done):.2f} s after the promotion")
    assert alive_before_promotion == [True, True] and alive == [True, True], \
        (tmp_path / "w0.log").read_text()[-3000:]
    assert codes == [0, 0]
    assert _scalar(standby, "SELECT count(*) FROM episodes") == ITEMS
    assert _scalar(standby, "SELECT count(DISTINCT project_id) FROM episodes") == ITEMS
    assert float(resumed) < 30, "claims resumed only after the leases ran out"
