"""The types a generator plugin sees: what it is asked for, what it answers, how it fails.

Everything here is plain data (frozen dataclasses) so a plugin needs nothing from the worker
beyond this module: no database handle, no settings object, no logger. The worker builds a
`GenerationRequest` from the queue item, awaits `Generator.generate`, validates the
`GenerationResult` (see `mf_worker.generation.validate`) and stores it in one transaction.
Failures are told apart by exception type only: `RetryableGenerationError` means "try again
later", anything else means the attempt failed for good.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Protocol, TypeAlias, runtime_checkable

from mf_worker.errors import MfWorkerError

__all__ = [
    "BlockDraft",
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
    "RetryableGenerationError",
    "TokenUsage",
    "UsageEstimator",
    "estimate_max_usage",
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
    """


class RetryableGenerationError(GenerationError):
    """A transient failure (rate limit, 5xx, timeout, refused connection): try again later.

    `retry_after` is the delay in seconds the provider asked for (e.g. a `Retry-After`
    header), if any. The worker waits at least that long, or its own backoff if longer. A
    negative, NaN or infinite value is ignored rather than rejected, so a sloppy header cannot
    turn a retryable error into a crash.
    """

    retry_after: float | None

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = _clean_delay(retry_after)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep `retry_after` when the error crosses a process boundary (pickling).
        return (type(self), (str(self), self.retry_after))


def _clean_delay(value: float | None) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    delay = float(value)
    return delay if math.isfinite(delay) and delay >= 0 else None


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

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_invalid_output, (type(self), str(self), self.field))


def _rebuild_invalid_output(
    cls: type[InvalidOutputError], message: str, field: str | None
) -> InvalidOutputError:
    return cls(message, field=field)


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
