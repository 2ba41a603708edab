"""A provider-like LLM server for tests and benchmarks: rate limits the way real providers do.

`ProviderServer` answers OpenAI-compatible ``POST /v1/chat/completions`` on 127.0.0.1 only, and
enforces requests per minute and tokens per minute with a token bucket each (refilled
continuously, holding ``burst_seconds`` of the rate, starting full). A call is admitted against
its prompt plus its ``max_tokens``, as hosted providers do; over a limit it answers 429 with the
headers real providers send: ``Retry-After`` (whole seconds), ``x-ratelimit-limit-requests`` /
``-tokens``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (``1s``, ``6m0s``,
``250ms``). An admitted call waits ``latency`` seconds and gets a valid episode in JSON with a
``usage`` block. Other modes: `outage` answers 503 for a while (or, with ``hang``, runs each call
but answers only after ``hang`` seconds: a client that gave up earlier meets a timeout after its
request was sent); `exhaust_quota` answers every call with the ``insufficient_quota`` 429 that
waiting does not fix; `broken_drafts` answers every first call of an item (its idempotency key
has no ``:repair``) with text that is not JSON, billed, so the generator makes a repair call, and
`repair_fault` makes that repair call meet a 429 (``rate_limited``), an exhausted quota
(``quota``) or a hang (``hang``).

Every decision is counted (`accepted`, `rate_limited`, `unavailable`, `quota_rejected`) with the
time and the organisation of each accepted call, read from the idempotency key's queue item
through an optional lookup. The server is bounded: it stops by itself after ``lifetime`` seconds
or ``max_calls`` calls, and it is a context manager. Threads, standard library only, so a
benchmark can run it in its own process beside real `mf-worker` processes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["Bucket", "ProviderServer", "format_reset"]


def format_reset(seconds: float) -> str:
    """A reset delay the way OpenAI writes it: ``250ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 1)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class Bucket:
    """A token bucket: ``per_minute`` refilled continuously, holding ``burst_seconds`` of it."""

    per_minute: float
    burst_seconds: float
    level: float = field(init=False)
    at: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.capacity
        self.at = time.monotonic()

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        return max(self.rate * self.burst_seconds, 1.0)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0 if it fits now); an amount above the capacity
        is admitted when the bucket is full, like a provider that counts a big call once."""
        need = min(amount, self.capacity) - self.level
        return max(need, 0.0) / self.rate

    def full_in(self) -> float:
        return (self.capacity - self.level) / self.rate


@dataclass
class Call:
    """One admitted call: when (monotonic) and for which queue item."""

    at: float
    item_id: str


class ProviderServer:
    """The rate-limited OpenAI-compatible server; see the module docstring."""

    def __init__(
        self,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        burst_seconds: float = 3.0,
        latency: float = 0.0,
        completion_tokens: int = 60,
        lifetime: float = 600.0,
        max_calls: int = 100_000,
        retry_after: Callable[[float], str] | None = None,
    ) -> None:
        self.requests = (Bucket(requests_per_minute, burst_seconds)
                         if requests_per_minute else None)
        self.tokens = Bucket(tokens_per_minute, burst_seconds) if tokens_per_minute else None
        self.latency = latency
        self.completion_tokens = completion_tokens
        self.max_calls = max_calls
        # How the Retry-After value is written (tests send garbage or huge values through it).
        self.retry_after = retry_after or (lambda wait: str(max(math.ceil(wait), 1)))
        self.lock = threading.Lock()
        self.accepted: list[Call] = []
        self.rate_limited = 0
        self.unavailable = 0
        self.quota_rejected = 0
        self.hung = 0  # calls run but answered too late (the client timed out after sending)
        self.calls = 0
        self.broken_drafts = False
        self.repair_fault: str | None = None  # "rate_limited", "quota" or "hang"
        self.hang_seconds = 0.0
        self._hang_until = 0.0
        self._outage_until = 0.0
        self._limited_until = 0.0
        self._limited_retry_after = "1"
        self._quota_exhausted = False
        self.started_at = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one connection per call, so a client left open at the end of a test
            # holds no socket (Python's ResourceWarning is an error in the suite).

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}}, {})
                    return
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                status, payload, headers, hang = server._decide(
                    body, self.headers.get("idempotency-key") or "")
                if status == 200 and server.latency:
                    time.sleep(server.latency)
                if hang:
                    time.sleep(hang)
                self._send(status, payload, headers)

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]
                      ) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="provider")
        self._lifetime = threading.Timer(lifetime, self.stop)
        self._lifetime.daemon = True
        self._stopped = False

    # -- control -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> ProviderServer:
        self._thread.start()
        self._lifetime.start()
        return self

    def stop(self) -> None:
        """Stop serving (safe to call twice, and from the lifetime timer)."""
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._lifetime.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ProviderServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def outage(self, seconds: float, *, hang: float = 0.0) -> None:
        """Answer 503 to every call for the next ``seconds``; with ``hang``, run every call
        of that time (billed, counted in `accepted` and `hung`) but answer it only ``hang``
        seconds later."""
        with self.lock:
            if hang:
                self._hang_until, self.hang_seconds = time.monotonic() + seconds, hang
            else:
                self._outage_until = time.monotonic() + seconds

    def rate_limit(self, seconds: float, *, retry_after: float = 3600.0) -> None:
        """Answer every call of the next ``seconds`` with a 429 whose ``Retry-After`` is
        ``retry_after`` (a provider that holds the account for a long while)."""
        with self.lock:
            self._limited_until = time.monotonic() + seconds
            self._limited_retry_after = str(max(math.ceil(retry_after), 1))

    def exhaust_quota(self, exhausted: bool = True) -> None:
        """Answer every call with the ``insufficient_quota`` 429 (or stop doing so)."""
        with self.lock:
            self._quota_exhausted = exhausted

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"accepted": len(self.accepted), "rate_limited": self.rate_limited,
                    "unavailable": self.unavailable, "quota_rejected": self.quota_rejected}

    # -- the decision --------------------------------------------------------------------------

    def _decide(self, body: dict[str, Any], item_id: str
                ) -> tuple[int, dict[str, Any], dict[str, str], float]:
        status, payload, headers = self._admit(body, item_id)
        hang = 0.0
        if status == 200:
            with self.lock:
                if (time.monotonic() < self._hang_until
                        or (item_id.endswith(":repair") and self.repair_fault == "hang")):
                    self.hung += 1
                    hang = self.hang_seconds
        return status, payload, headers, hang

    def _admit(self, body: dict[str, Any], item_id: str
               ) -> tuple[int, dict[str, Any], dict[str, str]]:
        prompt = _prompt_tokens(body)
        max_tokens = body.get("max_tokens")
        cost = prompt + (max_tokens if isinstance(max_tokens, int) else 0)
        now = time.monotonic()
        with self.lock:
            self.calls += 1
            if self.calls > self.max_calls:
                self.server_close_later()
                return 503, _error("the test provider's call budget is used up"), {}
            if now < self._outage_until:
                self.unavailable += 1
                return 503, _error("The server is overloaded or not ready yet.",
                                   kind="server_error"), {}
            if now < self._limited_until:
                self.rate_limited += 1
                return 429, _error("Rate limit reached for requests per min (RPM).",
                                   kind="requests", code="rate_limit_exceeded"), {
                                       "retry-after": self._limited_retry_after}
            repair = item_id.endswith(":repair")
            if repair and self.repair_fault == "rate_limited":
                self.rate_limited += 1
                return 429, _error("Rate limit reached for requests per min (RPM).",
                                   kind="requests", code="rate_limit_exceeded"), {
                                       "retry-after": "1"}
            if self._quota_exhausted or (repair and self.repair_fault == "quota"):
                self.quota_rejected += 1
                return 429, {"error": {
                    "message": "You exceeded your current quota, please check your plan and "
                               "billing details.",
                    "type": "insufficient_quota", "param": None, "code": "insufficient_quota",
                }}, {}
            waits = []
            for bucket, amount in ((self.requests, 1.0), (self.tokens, float(cost))):
                if bucket is not None:
                    bucket.refill(now)
                    waits.append(bucket.wait_for(amount))
            wait = max(waits, default=0.0)
            if wait > 0:
                self.rate_limited += 1
                which = "requests" if self.requests and self.requests.wait_for(1) > 0 else "tokens"
                headers = {"retry-after": self.retry_after(wait), **self._limit_headers()}
                return 429, _error(f"Rate limit reached for {which} per min (RPM). "
                                   f"Please try again in {format_reset(wait)}.",
                                   kind=which, code="rate_limit_exceeded"), headers
            for bucket, amount in ((self.requests, 1.0), (self.tokens, float(cost))):
                if bucket is not None:
                    bucket.level -= amount
            self.accepted.append(Call(now - self.started_at, item_id))
            headers = self._limit_headers()
            broken = self.broken_drafts and not repair
        return 200, _completion(body, prompt, self.completion_tokens, broken=broken), headers

    def server_close_later(self) -> None:
        threading.Thread(target=self.stop, daemon=True).start()

    def _limit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            headers[f"x-ratelimit-limit-{name}"] = str(int(bucket.per_minute))
            headers[f"x-ratelimit-remaining-{name}"] = str(max(int(bucket.level), 0))
            headers[f"x-ratelimit-reset-{name}"] = format_reset(bucket.full_in())
        return headers


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    chars = sum(len(str(m.get("content", ""))) for m in messages
                if isinstance(m, dict)) if isinstance(messages, list) else 0
    return math.ceil(chars / 4) + 8


def _error(message: str, *, kind: str = "server_error", code: str | None = None
           ) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _completion(body: dict[str, Any], prompt: int, completion: int, *, broken: bool = False
                ) -> dict[str, Any]:
    episode = {
        "title": "What moved this week",
        "sections": [
            {"markdown": "### Signals\n\nThree things moved; one matters.",
             "reasoning": "The brief asks for signals.", "confidence": 0.7},
        ],
        "used_note_ids": [],
        "new_memories": [],
    }
    content = "Sorry, here is prose instead of JSON." if broken else json.dumps(episode)
    return {
        "id": "chatcmpl-provider", "object": "chat.completion",
        "model": body.get("model", "model"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }
