"""The `openai` generator: episodes from any server speaking the OpenAI chat-completions API.

Hosted providers, vLLM, llama.cpp's server, Ollama — anything that answers
``POST {MF_LLM_BASE_URL}/chat/completions`` the OpenAI way. The generator is configured by its
own ``MF_LLM_*`` environment variables (see `LLMConfig`), talks HTTP through httpx (the optional
extra ``mf-worker[openai]``, imported only when the generator is built) and:

* builds a prompt from the `GenerationRequest` with the system prompt and the repair
  instructions kept as package resources (``prompts/system.txt``, ``prompts/repair.txt``);
* asks for one JSON object (title, sections with markdown / reasoning / confidence, the ids of
  the planning notes used, new memories), in JSON mode unless ``MF_LLM_JSON_MODE=off``, and
  parses the reply tolerantly (code fences, prose around the object, trailing commas,
  Python-style literals, sections given as plain strings); a reply it still cannot use gets
  exactly ONE repair turn. If that fails too, the complete part of a reply that was cut off or
  broke part-way is kept when it still holds a title and a section (``llm_reply_salvaged``);
  otherwise the attempt ends with a `PermanentGenerationError` naming the reason;
* reports the server's own token counts, summed over the calls (the repair turn included), and
  estimates (four characters per token) only for a reply without ``usage``, logging
  ``usage_estimated`` when it does;
* maps HTTP outcomes onto the plugin API's two error kinds: 429, 5xx, 408/409, timeouts and
  connection failures are retryable (with ``retry_after`` from ``Retry-After``, never slept on
  here: the queue waits, not the attempt); 400/401/403/404/422 and any other 4xx are permanent,
  with the server's own message. httpx's transport retries stay at 0 and every call has a hard
  deadline of ``MF_LLM_TIMEOUT`` seconds, so one attempt never outlives its lease.

The API key is never logged and never part of an error message: it is registered with the log
masker, and every text that came from the server is scrubbed of it before it is used.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from mf_worker.errors import ConfigError, MfWorkerError, PluginLoadError
from mf_worker.generation.api import (
    BlockDraft,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    MemoryDraft,
    PermanentGenerationError,
    QuotaExhaustedError,
    RateLimitedError,
    RetryableGenerationError,
    TokenUsage,
)
from mf_worker.generation.validate import MAX_TITLE_CHARS
from mf_worker.logs import get_logger, register_secret
from mf_worker.scheduling.cadence import CadenceError, parse_cadence
from mf_worker.settings import Secret

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ENV_VARIABLES",
    "LLMConfig",
    "OpenAICompatibleGenerator",
    "ReplyError",
    "build_messages",
    "parse_reply",
]

INSTALL_HINT: Final = "pip install 'mf-worker[openai]'"
CREDENTIAL_NAME: Final = "mf_llm_api_key"
"""File name of the API key in systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``)."""

ENV_VARIABLES: Final[tuple[tuple[str, str, str], ...]] = (
    ("MF_LLM_BASE_URL", "",
     "Base URL of the OpenAI-compatible API, up to and including `/v1` "
     "(e.g. `http://127.0.0.1:8080/v1`). Required by the `openai` generator."),
    ("MF_LLM_MODEL", "",
     "Model name sent to the server and used for pricing and token usage rows. Required by "
     "the `openai` generator."),
    ("MF_LLM_API_KEY", "",
     "API key sent as `Authorization: Bearer …` (optional: local servers need none). "
     "Never logged."),
    ("MF_LLM_API_KEY_FILE", "",
     "File holding the API key instead of `MF_LLM_API_KEY` (also read: "
     "`$CREDENTIALS_DIRECTORY/mf_llm_api_key`, systemd's `LoadCredential=`)."),
    ("MF_LLM_MAX_TOKENS", "1500",
     "Most tokens the model may write per call (`max_tokens`); with the one repair turn an "
     "episode can use twice this. A reply body is read up to 64 bytes per token plus 64 KiB "
     "(about 160 KiB at 1500); a larger one fails the attempt instead of filling memory."),
    ("MF_LLM_TEMPERATURE", "0.7", "Sampling temperature, 0 to 2 (0: most deterministic)."),
    ("MF_LLM_JSON_MODE", "on",
     "Ask for `response_format: json_object` (JSON mode; a JSON grammar on llama.cpp). Turn "
     "off for servers that reject it; the reply is then parsed tolerantly all the same."),
    ("MF_LLM_TIMEOUT", "120",
     "Seconds one HTTP call to the model may take in all; a slower call is a retryable "
     "failure."),
)
"""(variable, default, documentation) of every setting the `openai` generator reads."""

_DEFAULT_MAX_TOKENS: Final = 1500
_DEFAULT_TEMPERATURE: Final = 0.7
_DEFAULT_TIMEOUT: Final = 120.0

_CHARS_PER_TOKEN: Final = 4  # the estimate for replies without `usage`
_MESSAGE_OVERHEAD_TOKENS: Final = 8  # chat-template tokens around one message (generous)
_REQUEST_OVERHEAD_TOKENS: Final = 16

# How much of each input goes into the prompt, so a long brief cannot crowd out the answer.
_BRIEF_CHARS: Final = 2_000
_NOTE_CHARS: Final = 500
_MEMORY_CHARS: Final = 300
_PREVIOUS_TITLE_CHARS: Final = 150
_PREVIOUS_SUMMARY_CHARS: Final = 280
_PROMPT_NOTES: Final = 20
_PROMPT_MEMORIES: Final = 15
_BAD_REPLY_CHARS: Final = 8_000  # of a broken reply echoed back in the repair turn
_SERVER_MESSAGE_CHARS: Final = 300
_MAX_MEMORIES: Final = 10  # new memories kept from one reply
_SALVAGE_TRIES: Final = 200  # cut points tried, from the last one back

_PERMANENT_STATUSES: Final = frozenset({400, 401, 403, 404, 422})
_RETRYABLE_4XX: Final = frozenset({408, 409, 425, 429})
_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
                    "Sunday")
_JS_DAYS: Final = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                   "Saturday")
_MONTHS: Final = ("January", "February", "March", "April", "May", "June", "July", "August",
                  "September", "October", "November", "December")

def _logger() -> Any:
    # Looked up per use: a logger bound at import would keep the logging set-up of that moment.
    return get_logger("mf_worker.generation.openai")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """The `openai` generator's settings, validated; build it with `from_env`.

    `base_url` has no trailing slash; `api_key` is a `Secret` (or None for servers without
    authentication) whose value shows in no repr and no message.
    """

    base_url: str
    model: str
    api_key: Secret | None = None
    max_tokens: int = _DEFAULT_MAX_TOKENS
    temperature: float = _DEFAULT_TEMPERATURE
    timeout: float = _DEFAULT_TIMEOUT
    json_mode: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig:
        """Read and check the ``MF_LLM_*`` variables (and the key file or systemd credential).

        Raises `ConfigError` naming the variable and the problem; the key is never shown.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "").strip()

        base_url = get("MF_LLM_BASE_URL")
        if not base_url:
            raise ConfigError(
                "MF_LLM_BASE_URL is not set: give the OpenAI-compatible API's base URL, "
                "e.g. http://127.0.0.1:8080/v1"
            )
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"MF_LLM_BASE_URL={_display_url(base_url)!r}: must be an http:// or https:// "
                "URL with a host"
            )
        model = get("MF_LLM_MODEL")
        if not model:
            raise ConfigError(
                "MF_LLM_MODEL is not set: give the model name the server expects"
            )
        return cls(
            base_url=base_url.rstrip("/"),
            model=model,
            api_key=_api_key(env),
            max_tokens=_parse_int(env, "MF_LLM_MAX_TOKENS", _DEFAULT_MAX_TOKENS, 1, 1_000_000),
            temperature=_parse_float(env, "MF_LLM_TEMPERATURE", _DEFAULT_TEMPERATURE, 0.0, 2.0),
            timeout=_parse_float(env, "MF_LLM_TIMEOUT", _DEFAULT_TIMEOUT, 0.001, 3_600.0,
                                 exclusive_min=True),
            json_mode=_parse_bool(env, "MF_LLM_JSON_MODE", True),
        )

    @property
    def server(self) -> str:
        """How messages name the server: scheme, host and port only (no path, no userinfo)."""
        parts = urlsplit(self.base_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"


def _api_key(env: Mapping[str, str]) -> Secret | None:
    direct = env.get("MF_LLM_API_KEY", "").strip()
    key_file = env.get("MF_LLM_API_KEY_FILE", "").strip()
    if direct and key_file:
        raise ConfigError("MF_LLM_API_KEY and MF_LLM_API_KEY_FILE are both set; set only one")
    if direct:
        return Secret(direct)
    if key_file:
        return Secret(_read_key(Path(key_file).expanduser(), "MF_LLM_API_KEY_FILE"))
    credentials = env.get("CREDENTIALS_DIRECTORY", "").strip()
    if credentials:
        path = Path(credentials) / CREDENTIAL_NAME
        if path.is_file():
            return Secret(_read_key(path, f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}"))
    return None


def _read_key(path: Path, source: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{source}={str(path)!r}: cannot read the key file ({reason})") from None
    key = text.strip()
    if not key:
        raise ConfigError(f"{source}={str(path)!r}: the key file is empty")
    if any(ch.isspace() for ch in key):
        raise ConfigError(f"{source}={str(path)!r}: the key file holds more than one word")
    return key


def _parse_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r}: must be between {low} and {high:,}")
    return value


def _parse_float(
    env: Mapping[str, str], name: str, default: float, low: float, high: float,
    *, exclusive_min: bool = False,
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a number") from None
    if not math.isfinite(value) or value > high or value < low or (exclusive_min and value == 0):
        bound = "greater than 0" if exclusive_min else f"at least {low:g}"
        raise ConfigError(f"{name}={raw!r}: must be {bound} and at most {high:g}")
    return value


def _parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: must be one of on/off, true/false, yes/no, 1/0")


def _display_url(url: str) -> str:
    """A URL with any user:password part hidden."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def _import_httpx() -> ModuleType:
    try:
        import httpx
    except ImportError as exc:
        raise PluginLoadError(
            f"the 'openai' generator needs httpx, which is not installed: {INSTALL_HINT}"
        ) from exc
    return httpx


# --------------------------------------------------------------------------------------------
# The generator


@dataclass(frozen=True, slots=True)
class _Reply:
    content: str
    finish_reason: str | None
    usage: TokenUsage


class ReplyError(ValueError, MfWorkerError):
    """The model's reply is not the requested JSON; `reason` says why (no reply text in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Parsed:
    title: str
    blocks: tuple[BlockDraft, ...]
    note_ids: tuple[str, ...]
    memories: tuple[MemoryDraft, ...]


class OpenAICompatibleGenerator:
    """Writes episodes with a model behind an OpenAI-compatible chat-completions endpoint.

    Zero-argument constructible (the plugin loader calls the class): the configuration comes
    from the ``MF_LLM_*`` variables unless a `LLMConfig` is given. Construction fails with
    `ConfigError` (a bad variable) or `PluginLoadError` (httpx missing), so a misconfigured
    worker stops at start-up. One `httpx.AsyncClient` is shared by every call of the instance;
    it is created on first use (and again if the event loop changes) and closed by `aclose`.
    """

    def __init__(self, config: LLMConfig | None = None) -> None:
        self._httpx = _import_httpx()
        self.config = config or LLMConfig.from_env()
        self._key = self.config.api_key.reveal() if self.config.api_key else None
        register_secret(self._key)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        config = self.config
        return f"OpenAICompatibleGenerator(model={config.model!r}, server={config.server!r})"

    @property
    def limit_key(self) -> str:
        """The provider limit these calls count against: the API's base URL and the model
        (providers limit per account and model; the key itself is never part of it)."""
        return f"openai:{_display_url(self.config.base_url)}#{self.config.model}"

    # -- the plugin API ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Write the episode: one call, plus one repair call if the first reply is unusable."""
        messages = build_messages(request)
        first = await self._complete(messages, request.idempotency_key, call="draft")
        usages = [first.usage]
        try:
            parsed = _interpret(parse_reply(first.content, first.finish_reason), request)
        except ReplyError as exc:
            _logger().warning("llm_reply_unusable", call="draft", reason=exc.reason,
                              finish_reason=first.finish_reason)
            repair = [*messages,
                      {"role": "assistant", "content": first.content[:_BAD_REPLY_CHARS]},
                      {"role": "user", "content": repair_prompt(exc.reason)}]
            # A key of its own: a provider that deduplicates would replay the broken reply.
            try:
                second = await self._complete(repair, f"{request.idempotency_key}:repair",
                                              call="repair")
            except GenerationError as failed:  # the draft was billed all the same
                failed.usages = (*usages, *failed.usages)
                raise
            usages.append(second.usage)
            try:
                parsed = _interpret(parse_reply(second.content, second.finish_reason), request)
            except ReplyError as again:
                _logger().warning("llm_reply_unusable", call="repair", reason=again.reason,
                                  finish_reason=second.finish_reason)
                # Last resort: the complete part of a reply that was cut off or broke part-way.
                rescued = _salvaged(second, "repair", request) or _salvaged(first, "draft", request)
                if rescued is None:
                    raise PermanentGenerationError(
                        "the model's reply is not the requested JSON, even after one repair "
                        f"attempt: {again.reason}", usages=usages,
                    ) from None
                parsed = rescued
        usage = TokenUsage(
            model=self.config.model,
            prompt_tokens=sum(u.prompt_tokens for u in usages),
            completion_tokens=sum(u.completion_tokens for u in usages),
        )
        return GenerationResult(
            title=parsed.title,
            blocks=parsed.blocks,
            usage=usage,
            incorporated_note_ids=parsed.note_ids,
            new_memories=parsed.memories,
        )

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        """The most `generate(request)` can consume, for the cost reservation.

        A true upper bound rather than an estimate: a byte-level tokenizer never makes more
        tokens than the text has UTF-8 bytes, so the prompt side counts bytes (plus the chat
        template's overhead per message), and the model writes at most ``MF_LLM_MAX_TOKENS``.
        Because a broken first reply gets one repair call, which re-sends the prompt with the
        broken reply (at most ``MF_LLM_MAX_TOKENS``) and the repair instructions, the bound
        covers both calls: prompt ×2 + max_tokens + repair text, completion = 2 × max_tokens.
        """
        messages = build_messages(request)
        prompt = _upper_bound_tokens(messages)
        repair_text = _upper_bound_tokens(
            [{"role": "user", "content": repair_prompt("x" * 200)}]
        )
        max_tokens = self.config.max_tokens
        return TokenUsage(
            model=self.config.model,
            prompt_tokens=2 * prompt + max_tokens + _MESSAGE_OVERHEAD_TOKENS + repair_text,
            completion_tokens=2 * max_tokens,
        )

    async def aclose(self) -> None:
        """Close the HTTP client (the next call opens a new one)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.aclose()

    # -- HTTP ----------------------------------------------------------------------------------

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

    async def _complete(
        self, messages: list[dict[str, str]], idempotency_key: str, *, call: str
    ) -> _Reply:
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
        try:
            async with asyncio.timeout(config.timeout), client.stream(
                "POST", f"{config.base_url}/chat/completions", json=body, headers=headers
            ) as streamed:
                content = await self._read_capped(streamed)
                response = httpx.Response(streamed.status_code, headers=streamed.headers,
                                          content=content, request=streamed.request)
        except (TimeoutError, httpx.TimeoutException):
            raise RetryableGenerationError(
                f"LLM server {config.server} did not answer within {config.timeout:g} s "
                "(MF_LLM_TIMEOUT)"
            ) from None
        except httpx.TransportError as exc:
            raise RetryableGenerationError(
                f"cannot reach the LLM server {config.server}: {type(exc).__name__}"
                + (f" ({self._scrub(str(exc))[:120]})" if str(exc) else "")
            ) from None
        self._check_status(response)
        return self._reply(response, messages, call)

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

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
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

    def _reply(self, response: httpx.Response, messages: list[dict[str, str]], call: str
               ) -> _Reply:
        try:
            payload = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise RetryableGenerationError(
                f"LLM server sent a body that is not JSON (HTTP {response.status_code}, "
                f"{self._scrub(kind)[:60]})"
            ) from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
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
        if refused:
            assert isinstance(refusal, str)
            raise PermanentGenerationError(
                f"the model refused: {self._scrub(_one_line(refusal))[:_SERVER_MESSAGE_CHARS]}",
                usages=[usage],
            )
        if finish == "content_filter":
            raise PermanentGenerationError(
                "the model's reply was withheld by a content filter", usages=[usage])
        return _Reply(content=text, finish_reason=finish, usage=usage)

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
        return self._scrub(_shorten(_one_line(text), _SERVER_MESSAGE_CHARS))

    def _scrub(self, text: str) -> str:
        return redact_key(text, self._key)


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


def _upper_bound_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    return _REQUEST_OVERHEAD_TOKENS + sum(
        len(m["content"].encode("utf-8", "surrogatepass")) + _MESSAGE_OVERHEAD_TOKENS
        for m in messages
    )


# --------------------------------------------------------------------------------------------
# The prompt


@cache
def _prompt_resource(name: str) -> str:
    return resources.files("mf_worker.generation").joinpath("prompts", name).read_text(
        encoding="utf-8"
    ).strip()


def system_prompt() -> str:
    """The system prompt (``prompts/system.txt``)."""
    return _prompt_resource("system.txt")


def repair_prompt(reason: str) -> str:
    """The repair turn's instructions (``prompts/repair.txt``) with the reason filled in."""
    return _prompt_resource("repair.txt").replace("{reason}", reason)


def build_messages(request: GenerationRequest) -> list[dict[str, str]]:
    """The chat messages for `request`: the system prompt and one user message with the brief,
    cadence, episode number, local date, earlier episodes, memories and pending notes."""
    project = request.project
    day = request.local_date
    lines = [
        f"Project: {_inline(project.title, 200) or 'Untitled project'}",
        f"Brief: {_inline(project.description, _BRIEF_CHARS) or '(no brief given)'}",
        f"Cadence: {describe_cadence(project.cadence_config)}",
        f"Episode number: {request.episode_number}",
        f"Date: {_WEEKDAYS[day.weekday()]} {day.day} {_MONTHS[day.month - 1]} {day.year} "
        f"({project.timezone})",
        "",
        "Earlier episodes (most recent first):",
    ]
    previous = sorted(request.previous_episodes, key=lambda e: e.sequence_number, reverse=True)
    if previous:
        for episode in previous:
            summary = _inline(episode.summary, _PREVIOUS_SUMMARY_CHARS)
            lines.append(f"- Episode {episode.sequence_number}: "
                         f"{_inline(episode.title, _PREVIOUS_TITLE_CHARS)}"
                         + (f" — {summary}" if summary else ""))
    else:
        lines.append("- none: this is the first episode")
    lines += ["", "What we remember about the reader:"]
    memories = sorted(request.memories, key=lambda m: -m.importance)[:_PROMPT_MEMORIES]
    if memories:
        lines += [f"- ({m.memory_type}, importance {m.importance:.1f}) "
                  f"{_inline(m.content, _MEMORY_CHARS)}" for m in memories]
    else:
        lines.append("- nothing yet")
    lines += ["", "The reader's pending planning notes (cover them if you can; list the ids "
                  "you used in used_note_ids):"]
    notes = request.planning_notes[:_PROMPT_NOTES]
    if notes:
        lines += [f"- id {note.id}: {_inline(note.note, _NOTE_CHARS)}" for note in notes]
    else:
        lines.append("- none")
    lines += ["", f"Write episode {request.episode_number} now, as one JSON object."]
    return [
        {"role": "system", "content": system_prompt()},
        {"role": "user", "content": "\n".join(lines)},
    ]


def describe_cadence(config: object) -> str:
    """A project's cadence in words ("every weekday", "weekly, on Monday")."""
    if not isinstance(config, Mapping):
        return "not set"
    try:
        cadence = parse_cadence(config)
    except CadenceError:
        return _shorten(json.dumps(config, default=str, sort_keys=True), 120)
    if cadence.mode == "daily":
        return "daily"
    if cadence.mode == "weekdays":
        return "every weekday (Monday to Friday)"
    days = [_JS_DAYS[d] for d in sorted(cadence.allowed_js_days())]
    return f"{'weekly' if cadence.mode == 'weekly' else 'on certain days'}, on {', '.join(days)}"


# --------------------------------------------------------------------------------------------
# Parsing the reply


_TITLE_KEYS: Final = ("title", "headline", "episode_title")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\r?\n?(.*?)```", re.DOTALL)


def parse_reply(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    """The JSON object in a model's reply, found tolerantly.

    Looks in the contents of code fences first, then in the whole reply; in each, at every
    balanced ``{…}`` that parses — as strict JSON, then with trailing commas removed, then as a
    Python literal (single quotes, True/False/None). The first object that looks like an
    episode (has a title or sections) wins. Raises `ReplyError` saying why nothing fitted
    (empty reply, no object, an object cut off, invalid JSON and where).
    """
    cut_off = finish_reason == "length"
    if not text.strip():
        raise ReplyError("the reply was empty" + (" (cut off at max_tokens)" if cut_off else ""))
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    first_dict: dict[str, Any] | None = None
    invalid: str | None = None  # why the first object that did not parse failed
    unclosed = False
    for candidate in candidates:
        for start in _object_starts(candidate):
            end = _balanced_end(candidate, start)
            if end is None:
                unclosed = True
                break  # every later start is inside this unclosed object
            value = _lenient_loads(candidate[start:end])
            if isinstance(value, dict):
                if _looks_like_episode(value):
                    return value
                first_dict = first_dict or value
            elif invalid is None:
                invalid = _json_problem(candidate[start:end])
    if invalid is not None:
        raise ReplyError(f"the reply's JSON object is not valid JSON ({invalid})")
    if first_dict is not None:
        return first_dict  # no title: _interpret says so
    if unclosed:
        raise ReplyError(
            "the reply was cut off before the JSON object was complete (it reached max_tokens); "
            "write less" if cut_off else "the JSON object is not closed"
        )
    raise ReplyError("the reply contains no JSON object")


def _looks_like_episode(value: dict[str, Any]) -> bool:
    return any(key in value for key in (*_TITLE_KEYS, "sections")) or any(
        isinstance(v, dict) and "title" in v for v in value.values()
    )


def _json_problem(text: str) -> str:
    try:
        json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return "not an object"


def salvage_reply(text: str) -> dict[str, Any] | None:
    """What is usable of a JSON object that was cut off or goes wrong part-way.

    A small model at ``max_tokens`` stops mid-object, or writes a valid start and then
    something that is not JSON. This keeps the object up to its last complete member or element
    before the end (or before the first syntax error), closes what is still open, and returns
    it; None when nothing of it is left.
    """
    start = text.find("{")
    if start < 0:
        return None
    end = _balanced_end(text, start) or len(text)
    limit = end
    try:
        json.loads(text[start:end], strict=False)
    except json.JSONDecodeError as exc:
        limit = start + exc.pos
    closers: list[str] = []
    cuts: list[tuple[int, str]] = []  # (end of a complete prefix, the brackets it leaves open)
    for index, ch in _structure(text, start, limit):
        if ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if len(closers) < 2:
                break  # the outer object closes: nothing to cut
            closers.pop()
            cuts.append((index + 1, "".join(reversed(closers))))
        elif ch == ",":
            cuts.append((index, "".join(reversed(closers))))
    for cut, still_open in reversed(cuts[-_SALVAGE_TRIES:]):
        value = _lenient_loads(text[start:cut] + still_open)
        if isinstance(value, dict):
            return value
    return None


def _salvaged(reply: _Reply, call: str, request: GenerationRequest) -> _Parsed | None:
    """The episode in the complete part of a cut-off reply, if it has a title and a section."""
    obj = salvage_reply(reply.content)
    if obj is None:
        return None
    try:
        parsed = _interpret(obj, request)
    except ReplyError:
        return None
    _logger().warning("llm_reply_salvaged", call=call, finish_reason=reply.finish_reason,
                      blocks=len(parsed.blocks),
                      detail="the reply was cut off; kept its complete sections")
    return parsed


def _object_starts(text: str, limit: int = 50) -> list[int]:
    starts: list[int] = []
    index = text.find("{")
    while index != -1 and len(starts) < limit:
        starts.append(index)
        index = text.find("{", index + 1)
    return starts


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` that closes the ``{`` at ``start`` (strings respected)."""
    depth = 0
    for index, ch in _structure(text, start, len(text)):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _structure(text: str, start: int, stop: int) -> Iterator[tuple[int, str]]:
    """Index and character of every bracket and comma in ``text[start:stop]`` that is outside
    a JSON string: the one string-aware walk the salvage and the balancing share."""
    in_string = escaped = False
    for index in range(start, stop):
        ch = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{}[],":
            yield index, ch


def _lenient_loads(text: str) -> object:
    try:
        return json.loads(text, strict=False)
    except ValueError:
        pass
    fixed = _outside_strings(text, _drop_trailing_commas)
    try:
        return json.loads(fixed, strict=False)
    except ValueError:
        pass
    literal = _outside_strings(fixed, _json_words_to_python, quotes="\"'")
    try:
        return ast.literal_eval(literal)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _drop_trailing_commas(chunk: str) -> str:
    return re.sub(r",(\s*)(?=[}\]])", r"\1", chunk)


def _json_words_to_python(chunk: str) -> str:
    return re.sub(
        r"\b(true|false|null)\b",
        lambda m: {"true": "True", "false": "False", "null": "None"}[m.group()],
        chunk,
    )


def _outside_strings(text: str, change: Any, quotes: str = '"') -> str:
    """Apply ``change`` to the parts of ``text`` outside string literals."""
    out: list[str] = []
    chunk_start = 0
    index = 0
    while index < len(text):
        ch = text[index]
        if ch in quotes:
            out.append(change(text[chunk_start:index]))
            end = index + 1
            while end < len(text) and text[end] != ch:
                end += 2 if text[end] == "\\" else 1
            out.append(text[index:end + 1])
            index = chunk_start = end + 1
            continue
        index += 1
    out.append(change(text[chunk_start:]))
    return "".join(out)


def _interpret(obj: dict[str, Any], request: GenerationRequest) -> _Parsed:
    """Turn the reply's object into the episode; `ReplyError` if it lacks a title or text."""
    if not any(key in obj for key in ("title", "sections")):
        nested = [v for v in obj.values() if isinstance(v, dict) and "title" in v]
        if len(nested) == 1:
            obj = nested[0]  # {"episode": {...}}
    title = _first_text(obj, _TITLE_KEYS)
    title = re.sub(r"^#+\s*", "", _inline(title, 10 * MAX_TITLE_CHARS))
    if not title:
        raise ReplyError('the JSON object has no "title" string')
    if len(title) > MAX_TITLE_CHARS:
        title = _shorten(title, MAX_TITLE_CHARS)

    blocks = _blocks(obj.get("sections", obj.get("blocks")))
    if not blocks:
        raise ReplyError('the JSON object has no "sections" with markdown text')

    pending = {note.id for note in request.planning_notes}
    raw_ids = obj.get("used_note_ids", obj.get("incorporated_note_ids"))
    ids = [i.strip() for i in raw_ids if isinstance(i, str)] if isinstance(raw_ids, list) else []
    used = tuple(dict.fromkeys(i for i in ids if i in pending))
    dropped = [i for i in ids if i not in pending]
    if dropped:
        _logger().warning("unknown_note_ids_dropped", count=len(dropped),
                          note_ids=[_shorten(i, 40) for i in dropped[:10]])

    return _Parsed(title=title, blocks=blocks, note_ids=used,
                   memories=_memories(obj.get("new_memories", obj.get("memories"))))


def _blocks(raw: object) -> tuple[BlockDraft, ...]:
    if isinstance(raw, dict | str):
        raw = [raw]
    if not isinstance(raw, list):
        return ()
    blocks: list[BlockDraft] = []
    for section in raw:
        if isinstance(section, str):
            content, reasoning, confidence = section, None, None
        elif isinstance(section, dict):
            content = _first_text(section, ("markdown", "content", "text", "body"))
            heading = _first_text(section, ("heading", "title"))
            if content and heading and not content.lstrip().startswith("#"):
                content = f"### {_inline(heading, 200)}\n\n{content}"
            reason = section.get("reasoning")
            reasoning = _clean(reason).strip() if isinstance(reason, str) else None
            confidence = _unit(section.get("confidence"))
        else:
            continue
        content = _clean(content).strip()
        if content:
            blocks.append(BlockDraft(content=content, reasoning=reasoning or None,
                                     confidence=confidence))
    return tuple(blocks)


def _memories(raw: object) -> tuple[MemoryDraft, ...]:
    if not isinstance(raw, list):
        return ()
    found: list[MemoryDraft] = []
    for entry in raw:
        if isinstance(entry, str):
            content, memory_type, importance = entry, "preference", 0.5
        elif isinstance(entry, dict):
            content = _first_text(entry, ("content", "memory", "text"))
            kind = entry.get("memory_type", entry.get("type"))
            memory_type = _inline(kind, 50) if isinstance(kind, str) else "preference"
            unit = _unit(entry.get("importance"))
            importance = 0.5 if unit is None else unit
        else:
            continue
        content = _clean(content).strip()
        if content:
            found.append(MemoryDraft(content=content, memory_type=memory_type or "preference",
                                     importance=importance))
        if len(found) == _MAX_MEMORIES:
            break
    return tuple(found)


def _first_text(obj: Mapping[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _unit(value: object) -> float | None:
    """A confidence or importance: kept if a real number in 0..1, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0 <= number <= 1 else None


def _clean(text: str) -> str:
    """No NUL (PostgreSQL refuses it) and no lone surrogate (not encodable as UTF-8)."""
    text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def _inline(text: str, limit: int) -> str:
    return _shorten(" ".join(_clean(text).split()), limit)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
