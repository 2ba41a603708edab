"""The types a generator plugin sees: what it is asked for, what it answers, how it fails.

Everything here is plain data (frozen dataclasses) so a plugin needs nothing from the worker
beyond this module: no database handle, no settings object, no logger. The worker builds a
`GenerationRequest` from the queue item, awaits `Generator.generate`, validates the
`GenerationResult` (see `mf_worker.generation.validate`) and stores it in one transaction.
Failures are told apart by exception type only: `RetryableGenerationError` means "try again
later", anything else means the attempt failed for good.

A generator that calls a provider says what became of each call through the request's
`CallLedger` (``request.calls``): it opens every HTTP call with ``async with
request.calls.call(...)`` (the worker's flow control admits the call there: one request and its
tokens from the provider's limit), and marks it `answered` with its usage, `refused` (the
provider did not run it: nothing is booked) or leaves it unknown (a timeout after the request
was sent: its worst case is booked, marked as an estimate). See docs/plugins.md.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

from mf_worker.errors import MfWorkerError

__all__ = [
    "BlockDraft",
    "CallGate",
    "CallLedger",
    "CallOutcome",
    "CallsPaused",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "GeneratorFn",
    "InvalidOutputError",
    "Memory",
    "MemoryDraft",
    "PermanentGenerationError",
    "PlanningNote",
    "PreviousEpisode",
    "ProjectInfo",
    "ProviderCall",
    "QuotaExhaustedError",
    "RateLimitedError",
    "RetryableGenerationError",
    "TokenUsage",
    "UsageEstimator",
    "estimate_max_usage",
    "limit_key_of",
]


# --------------------------------------------------------------------------------------------
# Request


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    """The project's brief as the reader wrote it.

    Passed whole so a generator can build its own prompt; the worker does not pre-digest it.
    `cadence_config` is the raw JSON cadence of the project (treat it as read-only); it is left
    out of hashing so that requests stay usable as cache keys.
    """

    id: str
    title: str
    description: str
    cadence_config: dict[str, Any] = field(hash=False)
    timezone: str


@dataclass(frozen=True, slots=True)
class PlanningNote:
    """A pending note the reader left for the next episode.

    Only the ids a generator reports back in `GenerationResult.incorporated_note_ids` are marked
    as used; the others stay pending for a later episode.
    """

    id: str
    note: str


@dataclass(frozen=True, slots=True)
class Memory:
    """Something the system remembers about the reader (a preference, a fact, a dislike).

    `importance` is 0..1 so a generator with a small context window can keep the most
    important ones first.
    """

    content: str
    memory_type: str = "preference"
    importance: float = 0.5


@dataclass(frozen=True, slots=True)
class PreviousEpisode:
    """An earlier episode of the same project, so the new one can build on it, not repeat it."""

    sequence_number: int
    title: str
    summary: str


_ZERO = timedelta(0)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Everything a generator needs to write one episode, and nothing it must not touch.

    `attempt` is 1-based and grows on every retry of the same queue item. `idempotency_key`
    belongs to this attempt's claim alone: pass it to an LLM API that supports idempotent
    requests, so a call the plugin repeats within the attempt (a dropped connection) is not
    billed twice; every new attempt (a retry, a re-claim after a crash, an operator's `retry`)
    gets a new key, so a gateway that honours keys never replays an earlier attempt's reply.
    `scheduled_for` is the UTC instant the episode was due; `local_date` is that instant's date
    in the project's timezone, which is the date a reader would put on the episode.

    `calls` is this attempt's `CallLedger`: open each provider call through it (``async with
    request.calls.call(...)``) so that flow control admits the call and the worker books what the
    provider did with it. It is the one mutable part of a request (and is left out of equality
    and hashing); a request built outside the worker gets a ledger that admits every call.

    The constructor checks the two invariants plugins rely on (1-based attempt, UTC-aware
    `scheduled_for`) and turns list arguments into tuples so a request is really immutable.
    """

    queue_item_id: str
    attempt: int
    organization_id: str
    project: ProjectInfo
    episode_number: int
    scheduled_for: datetime
    local_date: date
    planning_notes: tuple[PlanningNote, ...]
    memories: tuple[Memory, ...]
    previous_episodes: tuple[PreviousEpisode, ...]
    idempotency_key: str
    calls: CallLedger = field(default_factory=lambda: CallLedger(), hash=False, compare=False,
                              repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise ValueError(f"attempt: {self.attempt!r} is not a 1-based attempt number")
        offset = self.scheduled_for.utcoffset()
        if offset is None or offset != _ZERO:
            raise ValueError(f"scheduled_for: {self.scheduled_for.isoformat()} is not UTC-aware")
        for name in ("planning_notes", "memories", "previous_episodes"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))


# --------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True, slots=True)
class BlockDraft:
    """One section of the episode, in markdown.

    `reasoning` (why the generator wrote this) and `confidence` (0..1, how sure it is) are
    optional and stored next to the block for the reader-facing "why am I seeing this" view.
    """

    content: str
    reasoning: str | None = None
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one model call consumed; the worker books cost per model from these."""

    model: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens, the number most price lists and budgets use."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class MemoryDraft:
    """Something the generator learned about the reader and wants remembered next time."""

    content: str
    memory_type: str = "preference"
    importance: float = 0.5


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What a generator returns: the episode, what it cost, and what it used or learned.

    `usage` takes one `TokenUsage` or a sequence of them, because a generator may call several
    models (draft, critique, summary) for one episode; read it through `usages`, which is
    always a tuple. The constructor does not check anything, on purpose: a malformed result is
    reported by `validate_result` as an `InvalidOutputError` naming the bad field, rather than
    as a `TypeError` from deep inside a plugin.
    """

    title: str
    blocks: Sequence[BlockDraft]
    usage: Sequence[TokenUsage] | TokenUsage
    incorporated_note_ids: Sequence[str] = ()
    new_memories: Sequence[MemoryDraft] = ()

    @property
    def usages(self) -> tuple[TokenUsage, ...]:
        """`usage` as a tuple, whether one `TokenUsage` or a sequence of them was given."""
        if isinstance(self.usage, TokenUsage):
            return (self.usage,)
        return tuple(self.usage)


# --------------------------------------------------------------------------------------------
# Errors


class GenerationError(MfWorkerError):
    """Base of every error a generator raises on purpose; the subclass decides the outcome.

    An exception that is not a `RetryableGenerationError` (including a bare `GenerationError`
    or any unexpected exception) ends the attempt for good.

    `usages` is what the calls the generator made before failing consumed, when it knows (a
    reply the model refused, a repair call that still gave garbage: the provider billed them).
    The worker books it against the organisation's day; when a generator cannot tell, the
    worker books the attempt's reserved worst case instead, marked as an estimate.
    """

    usages: tuple[TokenUsage, ...]

    def __init__(self, message: str, *, usages: Sequence[TokenUsage] = ()) -> None:
        super().__init__(message)
        self.usages = tuple(usages)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep every attribute (`usages`, `retry_after`, `field`) across a process boundary.
        return (_rebuild_error, (type(self), str(self), dict(self.__dict__)))


def _rebuild_error(
    cls: type[GenerationError], message: str, state: dict[str, Any]
) -> GenerationError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class RetryableGenerationError(GenerationError):
    """A transient failure (rate limit, 5xx, timeout, refused connection): try again later.

    `retry_after` is the delay in seconds the provider asked for (e.g. a `Retry-After`
    header), if any. The worker waits at least that long, or its own backoff if longer. A
    negative, NaN or infinite value is ignored rather than rejected, so a sloppy header cannot
    turn a retryable error into a crash.
    """

    retry_after: float | None

    def __init__(self, message: str, retry_after: float | None = None, *,
                 usages: Sequence[TokenUsage] = ()) -> None:
        super().__init__(message, usages=usages)
        self.retry_after = _clean_delay(retry_after)


def _clean_delay(value: float | None) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    delay = float(value)
    return delay if math.isfinite(delay) and delay >= 0 else None


RATE_LIMIT_MIN_SECONDS: Final = 0.5
"""The shortest wait a rate-limit answer can ask for; anything shorter is raised to this."""
RATE_LIMIT_MAX_SECONDS: Final = 900.0
"""The longest wait a rate-limit answer can ask for (15 minutes); longer is cut to this."""
RATE_LIMIT_DEFAULT_SECONDS: Final = 1.0
"""The wait assumed when a rate-limit answer gives none, or one that is not a number."""
QUOTA_PAUSE_SECONDS: Final = 600.0
"""How long calls under a limit key pause after an exhausted quota before one call probes."""


class RateLimitedError(RetryableGenerationError):
    """The provider refused the call for its rate limit (HTTP 429): not a failure of the item.

    The worker puts the item back without using up an attempt, to run again after
    `retry_after` seconds, and holds every worker's new calls under the generator's limit key
    until then (a shared cooldown). `retry_after` is always a number: the provider's delay
    clamped to `RATE_LIMIT_MIN_SECONDS`..`RATE_LIMIT_MAX_SECONDS` (0.5 s to 15 min), or
    `RATE_LIMIT_DEFAULT_SECONDS` (1 s) when it gave none or gave garbage, so one absurd header
    can neither park the fleet for days nor make it hammer the provider.
    """

    retry_after: float
    requests_per_minute: float | None
    tokens_per_minute: float | None

    def __init__(
        self, message: str, retry_after: float | None = None, *,
        requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
    ) -> None:
        super().__init__(message, _clamp_rate_limit(retry_after))
        # What the provider says its limits are (OpenAI: x-ratelimit-limit-requests/-tokens),
        # if it says: a fleet with no configured limits paces itself by them.
        self.requests_per_minute = _positive(requests_per_minute)
        self.tokens_per_minute = _positive(tokens_per_minute)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rate_limited, (type(self), str(self), self.retry_after,
                                        self.requests_per_minute, self.tokens_per_minute))


def _rebuild_rate_limited(cls: type[RateLimitedError], message: str, retry_after: float,
                          requests: float | None, tokens: float | None) -> RateLimitedError:
    return cls(message, retry_after, requests_per_minute=requests, tokens_per_minute=tokens)


def _positive(value: float | None) -> float | None:
    delay = _clean_delay(value)
    return delay if delay else None


def _clamp_rate_limit(value: float | None) -> float:
    delay = _clean_delay(value)
    if delay is None:
        return RATE_LIMIT_DEFAULT_SECONDS
    return min(max(delay, RATE_LIMIT_MIN_SECONDS), RATE_LIMIT_MAX_SECONDS)


class QuotaExhaustedError(RetryableGenerationError):
    """The provider account's quota or credit is used up (OpenAI: ``insufficient_quota``).

    Waiting a minute does not fix it; someone has to top up the account. The worker pauses
    calls under the generator's limit key for `QUOTA_PAUSE_SECONDS` (then lets one call probe),
    says so through the notifier and a metric, and puts the item back without using up an
    attempt: the items wait instead of failing. `retry_after` is that pause.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, QUOTA_PAUSE_SECONDS if retry_after is None else retry_after)


class PermanentGenerationError(GenerationError):
    """A failure that will not go away by retrying (bad request, content refused by the model).

    The worker marks the queue item failed at once, with this message as the reason.
    """


class InvalidOutputError(PermanentGenerationError):
    """The generator's result broke a rule; raised by `validate_result`.

    Permanent because the same request would very likely produce the same bad output.
    `field` is the path of the offending value (`"blocks[2].confidence"`, `"episode"`), so
    callers and tests need not parse the message.
    """

    field: str | None

    def __init__(self, message: str, *, field: str | None = None,
                 usages: Sequence[TokenUsage] = ()) -> None:
        super().__init__(message, usages=usages)
        self.field = field


# --------------------------------------------------------------------------------------------
# Provider calls: what became of each one


class CallOutcome(enum.StrEnum):
    """What the provider did with one call, which decides what the worker books for it."""

    ANSWERED = "answered"
    """It ran the call and answered (a 2xx, or an error reply that carries usage): its usage."""
    REFUSED = "refused"
    """It did not run it (a 429, ``insufficient_quota``, a 5xx or 4xx reply without usage, a
    connection refused or reset before the request was sent): nothing."""
    UNKNOWN = "unknown"
    """Nobody can tell (a timeout after the request was sent, a connection dropped mid-reply,
    an attempt stopped mid-call): the call's worst case (``max_usage``), marked estimated."""


@dataclass(slots=True)
class ProviderCall:
    """One call an attempt made to the provider, as `CallLedger.call` opened it.

    It is `CallOutcome.UNKNOWN` until the generator marks it: `answered` with the usage the
    provider reported, or `refused`. A call left unmarked (the generator raised, or the attempt
    was stopped mid-call: a timeout, a shutdown) stays unknown, which books its ``max_usage``
    as an estimate; so mark a call refused only when you are sure the provider did not run it.
    """

    name: str
    max_usage: TokenUsage | None = None
    outcome: CallOutcome = CallOutcome.UNKNOWN
    usage: TokenUsage | None = None
    charged_tokens: int = 0  # what flow control took for it (the worker's bookkeeping)

    def answered(self, usage: TokenUsage) -> None:
        """The provider ran the call and reported (or the plugin counted) ``usage``."""
        self.outcome, self.usage = CallOutcome.ANSWERED, usage

    def refused(self) -> None:
        """The provider did not run the call: nothing is booked for it."""
        self.outcome, self.usage = CallOutcome.REFUSED, None

    def unknown(self) -> None:
        """Whether the provider ran the call cannot be known: its worst case is booked."""
        self.outcome, self.usage = CallOutcome.UNKNOWN, None


class CallsPaused(RetryableGenerationError):
    """Raised by `CallLedger.call` when the worker will not let a call start: calls under the
    generator's limit key are held (a provider's reset after a 429, an exhausted quota) for
    longer than an item should wait. No call was made; let it propagate: the item goes back to
    the queue for when the hold ends, without using up an attempt. ``reason`` is
    ``rate_limited`` or ``quota_exhausted``."""

    reason: str

    def __init__(self, message: str, retry_after: float | None = None, *,
                 reason: str = "rate_limited") -> None:
        super().__init__(message, retry_after)
        self.reason = reason


CallGate: TypeAlias = Callable[[ProviderCall, int], Awaitable[None]]
"""What the worker runs before each call may start (``call``, its 0-based index in the
attempt): flow control takes the call's request and tokens, waiting for them, or raises
`CallsPaused`."""


class CallLedger:
    """The provider calls of one attempt (``request.calls``): admits each, and records it.

    ``async with request.calls.call("draft", max_usage=bound) as call:`` waits until the
    worker's flow control admits the call (one request, and ``max_usage``'s tokens, from the
    provider's limit key; it raises `CallsPaused` when the key is held for long), records it,
    and hands it back to be marked `ProviderCall.answered` or `ProviderCall.refused`. Open one
    per HTTP request, a retry or repair included. ``max_usage`` is that call's worst case (the
    prompt's upper bound plus ``max_tokens``): what an unknown call is booked at. Without it,
    an unknown call is booked at what is left of the attempt's reservation.
    """

    __slots__ = ("_calls", "_gate")

    def __init__(self, gate: CallGate | None = None) -> None:
        self._gate = gate
        self._calls: list[ProviderCall] = []

    def call(self, name: str = "call", *, max_usage: TokenUsage | None = None) -> _OpenCall:
        """Open one provider call (an async context manager yielding its `ProviderCall`)."""
        return _OpenCall(self, ProviderCall(name=name, max_usage=max_usage))

    @property
    def calls(self) -> tuple[ProviderCall, ...]:
        """The calls opened so far (each admitted, so each may have reached the provider)."""
        return tuple(self._calls)


class _OpenCall:
    __slots__ = ("_call", "_ledger")

    def __init__(self, ledger: CallLedger, call: ProviderCall) -> None:
        self._ledger, self._call = ledger, call

    async def __aenter__(self) -> ProviderCall:
        ledger = self._ledger
        if ledger._gate is not None:
            await ledger._gate(self._call, len(ledger._calls))
        # Recorded only once admitted: a call refused by the gate never left this process.
        ledger._calls.append(self._call)
        return self._call

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


# --------------------------------------------------------------------------------------------
# The plugin contract


@runtime_checkable
class Generator(Protocol):
    """Writes one episode; the only thing a generator plugin has to implement.

    `generate` must be `async` and should not block the event loop: the worker runs several
    generations concurrently on one loop. Raise `RetryableGenerationError` for transient
    failures and `PermanentGenerationError` for everything retrying will not fix; the worker
    enforces its own timeout, so a generator need not add one.

    Optional: a generator MAY also define `estimate_max_usage(request) -> TokenUsage`, a cheap,
    synchronous worst case of what `generate` will consume for this request. The worker calls
    it (through `estimate_max_usage()` below) before generating to reserve cost against the
    organisation's budget, and skips the reservation when the method is absent. It is not part
    of this Protocol so that a generator without it still matches; see `UsageEstimator`.
    """

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Write the episode for `request`."""
        ...


@runtime_checkable
class UsageEstimator(Protocol):
    """The optional cost-reservation method a `Generator` may also implement."""

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        """Return an upper bound of the tokens `generate(request)` will consume."""
        ...


GeneratorFn: TypeAlias = (
    Callable[[GenerationRequest], Awaitable[GenerationResult]]
    | Callable[[GenerationRequest], GenerationResult]
)
"""A plain function usable as a generator: `async def` is awaited, `def` runs in a thread."""


def estimate_max_usage(generator: object, request: GenerationRequest) -> TokenUsage | None:
    """Ask `generator` for its worst-case usage, or return None if it cannot tell.

    None means "no estimate", so the caller reserves nothing rather than guessing. A method
    that exists but returns something other than a sane `TokenUsage` is a plugin bug and
    raises `InvalidOutputError` (exceptions the method itself raises propagate unchanged).
    """
    method = getattr(generator, "estimate_max_usage", None)
    if method is None or not callable(method):
        return None
    estimate: object = method(request)
    where = "estimate_max_usage"
    if inspect.isawaitable(estimate):
        if inspect.iscoroutine(estimate):
            estimate.close()  # never awaited: close it so Python does not warn
        raise InvalidOutputError(
            f"{where}: must be synchronous, it returned an awaitable", field=where
        )
    if not isinstance(estimate, TokenUsage):
        raise InvalidOutputError(
            f"{where}: expected a TokenUsage, got {type(estimate).__name__}", field=where
        )
    if not isinstance(estimate.model, str) or not estimate.model.strip():
        raise InvalidOutputError(f"{where}.model: empty", field=f"{where}.model")
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(estimate, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidOutputError(
                f"{where}.{name}: expected an int, got {type(value).__name__}",
                field=f"{where}.{name}",
            )
        if value < 0:
            raise InvalidOutputError(
                f"{where}.{name}: {value} is negative", field=f"{where}.{name}"
            )
    return estimate


def limit_key_of(generator: object) -> str | None:
    """The provider limit a generator's calls count against, or None if it does not say.

    A generator declares it with a `limit_key` attribute (or property): a string naming the
    account and model its calls share a rate limit on, such as the `openai` generator's
    ``"openai:http://host:port/v1#gpt-4o-mini"``. Workers that use the same key share one
    request and token budget and one cooldown through the database. Anything but a non-empty
    string (or an attribute that raises) counts as no key.
    """
    try:
        key = getattr(generator, "limit_key", None)
    except Exception:
        return None
    if isinstance(key, str) and key.strip():
        return key.strip()[:200]
    return None
