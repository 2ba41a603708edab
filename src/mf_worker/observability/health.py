"""The daemon's HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

A small threaded server (stdlib) so a wedged event loop cannot also silence the endpoint that
reports it: ``/healthz`` answers from what the claim loop last recorded, without touching the
loop. It fails when the loop has not gone round for ``MF_HEALTH_STALL_SECONDS`` (wedged), and
when the worker has had room for ``MF_HEALTH_STARVED_SECONDS`` without claiming what it should
(its claims fail, or come back empty while items it may take are due, or flow control admits
none while it holds nothing): a worker that cannot do its work says so, and the service manager
restarts it. ``/readyz`` asks the event loop to reach the database, check that migrations are
current and that the server takes writes (not a standby in recovery, not read-only), with a short
timeout — a loop that cannot answer is not ready either. Both return 200 or 503 with a small
JSON body.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..db import Connection
from ..db.sql import load_queries
from ..errors import ConfigError, MfWorkerError, describe_error

_Q = load_queries(__package__ or "mf_worker.observability", "health.sql")

# What the claim loop reports about itself: why it is starved (None: it is not), for how many
# seconds, and the last claim error if its claims fail.
Starved = Callable[[], tuple[str | None, float, str | None]]


def _never_starved() -> tuple[str | None, float, str | None]:
    return None, 0.0, None


class ServerNotWritable(MfWorkerError):
    """The database server does not take writes (a standby in recovery, or read-only)."""


async def check_writable(conn: Connection) -> None:
    """Raise `ServerNotWritable` unless the server behind ``conn`` takes writes: during a
    failover a connection may reach the standby before its promotion."""
    cur = await conn.execute(_Q["read_server_role"])
    row = await cur.fetchone()
    assert row is not None
    if row["in_recovery"]:
        raise ServerNotWritable("the database server is a standby in recovery (read-only)")
    if row["read_only"]:
        raise ServerNotWritable("the database server's transactions are read-only "
                                "(default_transaction_read_only)")


def parse_addr(text: str) -> tuple[str, int]:
    """``host:port`` (``:9464`` means all interfaces); port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"MF_METRICS_ADDR={text!r}: expected host:port, e.g. 0.0.0.0:9464")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - scraped from outside


class HealthServer:
    """Serves the endpoints from a daemon thread; :meth:`stop` is safe to call twice."""

    def __init__(
        self,
        addr: str,
        *,
        registry: CollectorRegistry,
        loop: asyncio.AbstractEventLoop,
        claim_loop_age: Callable[[], float],
        stall_seconds: float,
        ready_check: Callable[[], Coroutine[Any, Any, None]],
        ready_timeout: float = 3.0,
        starved: Starved = _never_starved,
        starved_seconds: float = 60.0,
    ) -> None:
        self._registry, self._loop = registry, loop
        self._claim_loop_age, self._stall_seconds = claim_loop_age, stall_seconds
        self._starved, self._starved_seconds = starved, starved_seconds
        self._ready_check, self._ready_timeout = ready_check, ready_timeout
        host, port = parse_addr(addr)
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        name="mf-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def healthz(self) -> tuple[int, dict[str, Any]]:
        age = self._claim_loop_age()
        if age > self._stall_seconds:
            return 503, {"status": "stalled", "claim_loop_age_seconds": round(age, 3),
                         "threshold_seconds": self._stall_seconds}
        why, starved, error = self._starved()
        if why is not None and starved >= self._starved_seconds:
            body: dict[str, Any] = {
                "status": "not claiming", "reason": why, "starved_seconds": round(starved, 3),
                "threshold_seconds": self._starved_seconds}
            if error:
                body["error"] = error
            return 503, body
        return 200, {"status": "ok", "claim_loop_age_seconds": round(age, 3),
                     "starved_seconds": round(starved, 3)}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        started = time.monotonic()
        try:
            future = asyncio.run_coroutine_threadsafe(self._ready_check(), self._loop)
            future.result(timeout=self._ready_timeout)
        except Exception as exc:
            return 503, {"status": "not ready", "error": describe_error(exc)}
        return 200, {"status": "ready", "seconds": round(time.monotonic() - started, 4)}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(server._registry))
                elif path in ("/healthz", "/readyz"):
                    status, body = server.healthz() if path == "/healthz" else server.readyz()
                    self._send(status, "application/json", json.dumps(body).encode())
                else:
                    self._send(404, "application/json", b'{"error": "not found"}')

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not log-worthy
                pass

        return Handler
