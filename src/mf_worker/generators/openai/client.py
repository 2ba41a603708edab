"""The `openai` generator's HTTP side: one chat-completions call, and what its answer means.

`ChatClient.complete` POSTs the messages to ``{MF_LLM_BASE_URL}/chat/completions`` through
httpx (the optional extra ``mf-worker[openai]``, imported only when a client is built), reads
the body up to a cap, and maps the outcome onto the plugin API's two error kinds: 429, 5xx,
408/409, timeouts and connection failures are retryable; 400/401/403/404/422 and any other 4xx
are permanent, with the server's own message. It reports the server's token counts, or
estimates them (four characters per token) for a reply without ``usage``.

Retries: this module has no retry loop of its own, on purpose. httpx's transport retries stay
at 0 and every call has a hard deadline of ``MF_LLM_TIMEOUT`` seconds, so one attempt never
outlives its lease; a retryable failure carries ``retry_after`` (from ``retry-after-ms``,
``Retry-After`` or a 429's ``x-ratelimit-reset-*``, parsed by `retry_after_seconds` and
`rate_limit_delay` below) and the queue waits, never this call. That delay parsing is the
generator's part of the retry/backoff story; the backoff itself is the engine's.

Each call also says what the provider did with it (`ProviderCall`, the attempt's ledger entry):
answered with usage (a 2xx, or an error reply that carries ``usage``), refused (a 429, a 5xx or
4xx reply without usage, a connection refused, or a timeout or reset before the request's body
was sent: httpcore's trace events tell where the request got to), or unknown (a timeout or a
dropped connection after the request was sent, a 2xx reply that cannot be read): the worker
books the usage, nothing, or the call's worst case as an estimate.

The API key is never logged and never part of an error message: it is registered with the log
masker, and every text that came from the server is scrubbed of it before it is used.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from mf_worker.errors import PluginLoadError
from mf_worker.generation.api import (
    PermanentGenerationError,
    ProviderCall,
    QuotaExhaustedError,
    RateLimitedError,
    RetryableGenerationError,
    TokenUsage,
)
from mf_worker.logs import get_logger, register_secret

from ._text import one_line, shorten
from .config import LLMConfig

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ChatClient",
    "Reply",
    "parse_reset",
    "rate_limit_delay",
    "redact_key",
    "retry_after_seconds",
]

INSTALL_HINT: Final = "pip install 'mf-worker[openai]'"
_CHARS_PER_TOKEN: Final = 4  # the estimate for replies without `usage`
_SERVER_MESSAGE_CHARS: Final = 300
_PERMANENT_STATUSES: Final = frozenset({400, 401, 403, 404, 422})
_RETRYABLE_4XX: Final = frozenset({408, 409, 425, 429})


def _logger() -> Any:
    # Looked up per use: a logger bound at import would keep the logging set-up of that moment.
    return get_logger("mf_worker.generation.openai")


def _import_httpx() -> ModuleType:
    try:
        import httpx
    except ImportError as exc:
        raise PluginLoadError(
            f"the 'openai' generator needs httpx, which is not installed: {INSTALL_HINT}"
        ) from exc
    return httpx



@dataclass(frozen=True, slots=True)
class Reply:
    """One call's answer: the model's text, why it stopped, and the tokens it was billed."""

    content: str
    finish_reason: str | None
    usage: TokenUsage


class ChatClient:
    """Chat-completions calls for one `LLMConfig`, over one shared `httpx.AsyncClient`.

    The HTTP client is created on first use (and again if the event loop changes) and closed
    by `aclose`. Construction fails with `PluginLoadError` when httpx is missing.
    """

    def __init__(self, config: LLMConfig) -> None:
        self._httpx = _import_httpx()
        self.config = config
        self._key = config.api_key.reveal() if config.api_key else None
        register_secret(self._key)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    async def aclose(self) -> None:
        """Close the HTTP client (the next call opens a new one)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            # Connections belong to the loop that opened them: a new loop needs a new client.
            # httpx's transport retries are 0 by default and stay so (no `transport=` here, which
            # would also drop the proxy settings of the environment).
            httpx = self._httpx
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout),
                follow_redirects=False,
                headers={"Accept": "application/json"},
            )
            self._client_loop = loop
        return self._client

    async def complete(
        self, messages: list[dict[str, str]], idempotency_key: str, *, call: str,
        record: ProviderCall | None = None,
    ) -> Reply:
        """One chat-completions call; ``record`` (the attempt's ledger entry for it) is marked
        answered or refused when the outcome says so, and left unknown otherwise."""
        record = record if record is not None else ProviderCall(call)
        httpx = self._httpx
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "messages": messages,
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
            "stream": False,
        }
        if config.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Idempotency-Key": idempotency_key}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        client = self._http()
        progress = _Progress()
        try:
            async with asyncio.timeout(config.timeout), client.stream(
                "POST", f"{config.base_url}/chat/completions", json=body, headers=headers,
                extensions={"trace": progress.trace},
            ) as streamed:
                content = await self._read_capped(streamed)
                response = httpx.Response(streamed.status_code, headers=streamed.headers,
                                          content=content, request=streamed.request)
        except (TimeoutError, httpx.TimeoutException) as exc:
            if progress.unsent(exc, httpx):
                record.refused()
            raise RetryableGenerationError(
                f"LLM server {config.server} did not answer within {config.timeout:g} s "
                "(MF_LLM_TIMEOUT)"
            ) from None
        except httpx.TransportError as exc:
            if progress.unsent(exc, httpx):
                record.refused()
            raise RetryableGenerationError(
                f"cannot reach the LLM server {config.server}: {type(exc).__name__}"
                + (f" ({self.scrub(str(exc))[:120]})" if str(exc) else "")
            ) from None
        self._check_status(response, messages, call, record)
        return self._reply(response, messages, call, record)

    async def _read_capped(self, streamed: httpx.Response) -> bytes:
        """The body, read only up to :meth:`max_reply_bytes`: a server (or a proxy in front of
        it) that sends more is broken, and must not fill the worker's memory."""
        limit = self.max_reply_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in streamed.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise PermanentGenerationError(
                    f"LLM server {self.config.server} sent a reply larger than {limit:,} bytes "
                    f"(HTTP {streamed.status_code}); reading stopped (64 bytes per "
                    "MF_LLM_MAX_TOKENS token plus 64 KiB)"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply body read: 64 bytes per ``max_tokens`` token (JSON escapes can
        take six bytes per character) plus 64 KiB for the envelope."""
        return 64 * self.config.max_tokens + 64 * 1024

    def _check_status(self, response: httpx.Response, messages: list[dict[str, str]],
                      call: str, record: ProviderCall) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        # An error reply the provider billed says so with `usage`; one without it is a call
        # the provider did not run (providers do not bill a 429, a 5xx or a rejected request).
        payload = _json_or_none(response)
        raw_usage = payload.get("usage") if isinstance(payload, dict) else None
        if isinstance(raw_usage, dict):
            record.answered(self._usage(raw_usage, messages, "", call, None))
        else:
            record.refused()
        message = self._server_message(response)
        what = f"HTTP {status}" + (f": {message}" if message else "")
        if status in (402, 429) and _quota_exhausted(response):
            raise QuotaExhaustedError(f"LLM provider quota exhausted ({what})")
        if status == 429:
            raise RateLimitedError(
                f"LLM server rate limit ({what})", retry_after=rate_limit_delay(response.headers),
                requests_per_minute=_stated_limit(response.headers, "requests"),
                tokens_per_minute=_stated_limit(response.headers, "tokens"),
            )
        if status >= 500 or status in _RETRYABLE_4XX:
            raise RetryableGenerationError(
                f"LLM server error ({what})", retry_after=retry_after_seconds(response.headers)
            )
        if status in _PERMANENT_STATUSES or 400 <= status < 500:
            raise PermanentGenerationError(f"LLM server refused the request ({what})")
        raise PermanentGenerationError(f"LLM server gave an unexpected answer ({what})")

    def _reply(self, response: httpx.Response, messages: list[dict[str, str]], call: str,
               record: ProviderCall) -> Reply:
        try:
            payload = response.json()
        except ValueError:
            # A 2xx that cannot be read: the model may well have run (unknown, estimated).
            kind = response.headers.get("content-type", "no content type")
            raise RetryableGenerationError(
                f"LLM server sent a body that is not JSON (HTTP {response.status_code}, "
                f"{self.scrub(kind)[:60]})"
            ) from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                record.answered(self._usage(payload["usage"], messages, "", call, None))
            said = self._server_message(response)
            raise PermanentGenerationError(
                "LLM server answered without any choice" + (f": {said}" if said else "")
            )
        choice = choices[0]
        raw_message = choice.get("message")
        message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
        finish_reason = choice.get("finish_reason")
        finish = finish_reason if isinstance(finish_reason, str) else None
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        refusal = message.get("refusal")
        refused = isinstance(refusal, str) and bool(refusal.strip())
        # Counted before a refusal is raised: a refused or filtered reply was billed too.
        usage = self._usage(payload.get("usage"), messages,
                            refusal if refused and isinstance(refusal, str) else text,
                            call, finish)
        record.answered(usage)
        if refused:
            assert isinstance(refusal, str)
            raise PermanentGenerationError(
                f"the model refused: {self.scrub(one_line(refusal))[:_SERVER_MESSAGE_CHARS]}",
                usages=[usage],
            )
        if finish == "content_filter":
            raise PermanentGenerationError(
                "the model's reply was withheld by a content filter", usages=[usage])
        return Reply(content=text, finish_reason=finish, usage=usage)

    def _usage(self, raw: object, messages: list[dict[str, str]], text: str, call: str,
               finish: str | None) -> TokenUsage:
        prompt = _count(raw, "prompt_tokens")
        completion = _count(raw, "completion_tokens")
        if prompt is not None and completion is not None:
            _logger().info("llm_usage", call=call, source="server", model=self.config.model,
                           prompt_tokens=prompt, completion_tokens=completion,
                           finish_reason=finish)
            return TokenUsage(self.config.model, prompt, completion)
        prompt = _estimate_tokens(sum(len(m["content"]) for m in messages))
        completion = _estimate_tokens(len(text))
        _logger().warning("usage_estimated", call=call, model=self.config.model,
                          prompt_tokens=prompt, completion_tokens=completion,
                          detail="the server reported no token usage; counted 4 characters a "
                                 "token")
        return TokenUsage(self.config.model, prompt, completion)

    def _server_message(self, response: httpx.Response) -> str:
        """The server's own explanation, on one line, shortened, without the key."""
        text = ""
        try:
            payload: object = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            error = payload.get("error")
            if isinstance(error, dict):
                error = error.get("message") or error.get("type") or error.get("code")
            for candidate in (error, payload.get("message"), payload.get("detail")):
                if isinstance(candidate, str) and candidate.strip():
                    text = candidate
                    break
                if candidate is not None and not isinstance(candidate, str):
                    text = json.dumps(candidate, ensure_ascii=False, default=str)
                    break
        if not text:
            text = response.text
        return self.scrub(shorten(one_line(text), _SERVER_MESSAGE_CHARS))

    def scrub(self, text: str) -> str:
        return redact_key(text, self._key)



class _Progress:
    """How far one request got, from httpcore's ``trace`` events: whether anything was traced
    at all, and whether the request's body was completely sent."""

    __slots__ = ("sent", "traced")

    def __init__(self) -> None:
        self.traced = False
        self.sent = False

    async def trace(self, name: str, _info: dict[str, Any]) -> None:
        self.traced = True
        if name.endswith("send_request_body.complete"):
            self.sent = True

    def unsent(self, exc: BaseException, httpx: ModuleType) -> bool:
        """Whether the failed request certainly never reached the provider whole: the
        connection was refused or timed out, the pool had no connection, writing failed, or
        the trace shows the body was not sent. Otherwise (read timeouts, a reply cut off, a
        transport that traces nothing) nobody can tell."""
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                      | httpx.WriteError | httpx.WriteTimeout):
            return True
        return self.traced and not self.sent


def _json_or_none(response: httpx.Response) -> object:
    try:
        payload: object = response.json()
    except ValueError:
        return None
    return payload


# --------------------------------------------------------------------------------------------
# Helpers: HTTP


def retry_after_seconds(
    headers: Mapping[str, str], *, now: datetime | None = None
) -> float | None:
    """The delay a response asks for: ``retry-after-ms``, else ``Retry-After`` in seconds or as
    an HTTP date; None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            value = float(millis.strip())
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(raw: str) -> float | None:
    """A provider's ``x-ratelimit-reset-*`` value in seconds: ``1s``, ``6m0s``, ``250ms``,
    ``1h2m3.5s`` or a plain number of seconds; None when it is none of those."""
    text = raw.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def rate_limit_delay(
    headers: Mapping[str, str], *, now: datetime | None = None
) -> float | None:
    """How long a 429 asks to wait: ``retry-after-ms`` or ``Retry-After`` if usable, else the
    longest ``x-ratelimit-reset-*`` of a limit whose ``x-ratelimit-remaining-*`` is 0 (or of
    any limit, when none says so); None when nothing usable was sent. `RateLimitedError`
    clamps the result to its documented range."""
    explicit = retry_after_seconds(headers, now=now)
    if explicit is not None:
        return explicit
    resets: dict[str, float] = {}
    for name in ("requests", "tokens"):
        raw = headers.get(f"x-ratelimit-reset-{name}")
        value = parse_reset(raw) if raw else None
        if value is not None:
            resets[name] = value
    exhausted = [v for n, v in resets.items()
                 if (headers.get(f"x-ratelimit-remaining-{n}") or "").strip() == "0"]
    candidates = exhausted or list(resets.values())
    return max(candidates) if candidates else None


def _stated_limit(headers: Mapping[str, str], name: str) -> float | None:
    """``x-ratelimit-limit-requests`` / ``-tokens``: the provider's own per-minute limit."""
    raw = (headers.get(f"x-ratelimit-limit-{name}") or "").strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _quota_exhausted(response: httpx.Response) -> bool:
    """Whether the answer is OpenAI's ``insufficient_quota`` (billing, not a rate limit)."""
    try:
        payload: object = response.json()
    except ValueError:
        return False
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return False
    return "insufficient_quota" in (error.get("code"), error.get("type"))


def redact_key(text: str, key: str | None) -> str:
    """``text`` without the key, and without any word that quotes a fragment of it (servers
    like to echo ``sk-abc…xyz``): such a word becomes ``***``."""
    if not key:
        return text
    text = text.replace(key, "***")

    def scrub(match: re.Match[str]) -> str:
        word = match.group()
        pieces = re.findall(r"[A-Za-z0-9_\-]{6,}", word)
        return "***" if any(piece in key for piece in pieces) else word

    return re.sub(r"[^\s\"'`,;:()\[\]{}<>]{6,}", scrub, text)


def _count(raw: object, name: str) -> int | None:
    if not isinstance(raw, dict):
        return None
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _estimate_tokens(chars: int) -> int:
    return math.ceil(chars / _CHARS_PER_TOKEN)
