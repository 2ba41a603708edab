"""Checking a generator's result before anything of it reaches the database.

A plugin is third-party code; the worker trusts nothing it returns. Every rule here exists
because breaking it would either fail the storing transaction in a confusing way (a NUL byte
PostgreSQL rejects, a lone surrogate that cannot be encoded), corrupt bookkeeping (negative
tokens, a note id of another project) or produce an episode nobody can read (no title, no
blocks, a 50 MB blob). The first broken rule raises `InvalidOutputError` with a one-line
message naming the field path and the problem, never the offending text itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn, TypeGuard, TypeVar

from mf_worker.generation.api import (
    BlockDraft,
    GenerationRequest,
    GenerationResult,
    InvalidOutputError,
    MemoryDraft,
    TokenUsage,
)

__all__ = ["MAX_TITLE_CHARS", "validate_result"]

MAX_TITLE_CHARS = 500
"""Longest accepted title, in characters: a title is a headline, not a paragraph."""

_SHOWN_CHARS = 40  # how much of an offending identifier a message may quote

_T = TypeVar("_T")


def validate_result(
    result: object, request: GenerationRequest, *, max_episode_bytes: int
) -> GenerationResult:
    """Check `result` against the rules above and return it normalised.

    Normalised means: every sequence is a tuple, `usage` is the tuple of `usages`, and
    duplicate `incorporated_note_ids` are collapsed (first occurrence wins). `max_episode_bytes`
    bounds the UTF-8 size of the title plus every block's content and reasoning
    (`MF_MAX_EPISODE_BYTES`). Raises `InvalidOutputError` on the first broken rule.
    """
    if isinstance(max_episode_bytes, bool) or not isinstance(max_episode_bytes, int):
        raise TypeError("max_episode_bytes must be an int")
    if max_episode_bytes < 1:
        raise ValueError(f"max_episode_bytes must be positive, got {max_episode_bytes}")
    if not isinstance(result, GenerationResult):
        _fail("result", f"expected a GenerationResult, got {_kind(result)}")

    size = _text("title", result.title, required=True)
    if len(result.title) > MAX_TITLE_CHARS:
        _fail("title", f"{len(result.title):,} characters, over the limit of {MAX_TITLE_CHARS}")

    blocks = _items("blocks", result.blocks, BlockDraft)
    if not blocks:
        _fail("blocks", "no blocks")
    for i, block in enumerate(blocks):
        size += _text(f"blocks[{i}].content", block.content, required=True)
        if block.reasoning is not None:
            size += _text(f"blocks[{i}].reasoning", block.reasoning, required=False)
        if block.confidence is not None:
            _unit_interval(f"blocks[{i}].confidence", block.confidence)
    if size > max_episode_bytes:
        _fail(
            "episode",
            f"{size:,} bytes, over the limit of {max_episode_bytes:,} (MF_MAX_EPISODE_BYTES)",
            joiner=" is ",
        )

    usages = _usages(result.usage)
    for i, usage in enumerate(usages):
        _text(f"usage[{i}].model", usage.model, required=True)
        _count(f"usage[{i}].prompt_tokens", usage.prompt_tokens)
        _count(f"usage[{i}].completion_tokens", usage.completion_tokens)

    note_ids = _note_ids(result.incorporated_note_ids, request)

    memories = _items("new_memories", result.new_memories, MemoryDraft)
    for i, memory in enumerate(memories):
        _text(f"new_memories[{i}].content", memory.content, required=True)
        _text(f"new_memories[{i}].memory_type", memory.memory_type, required=True)
        _unit_interval(f"new_memories[{i}].importance", memory.importance)

    return replace(
        result,
        blocks=blocks,
        usage=usages,
        incorporated_note_ids=note_ids,
        new_memories=memories,
    )


# --------------------------------------------------------------------------------------------
# Rules


def _text(where: str, value: object, *, required: bool) -> int:
    """Check one string and return its UTF-8 size in bytes."""
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {_kind(value)}")
    if required and not value.strip():
        _fail(where, "empty")
    if "\x00" in value:
        _fail(where, "contains a NUL byte")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        _fail(where, f"not valid Unicode (lone surrogate at index {exc.start})")


def _unit_interval(where: str, value: object) -> None:
    """A confidence or importance: a real number in 0..1 (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(where, f"expected a number, got {_kind(value)}")
    if not math.isfinite(value):
        _fail(where, f"{value!r} is not a finite number")
    if not 0 <= value <= 1:
        _fail(where, f"{value!r} is outside 0..1")


def _count(where: str, value: object) -> None:
    """A token count: a non-negative int (not a float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, f"expected an int, got {_kind(value)}")
    if value < 0:
        _fail(where, f"{value} is negative")


def _items(where: str, value: object, item_type: type[_T]) -> tuple[_T, ...]:
    """A list or tuple whose items are all `item_type`; returned as a tuple."""
    if not _is_sequence(value):
        _fail(where, f"expected a list of {item_type.__name__}, got {_kind(value)}")
    items: list[_T] = []
    for i, item in enumerate(value):
        if not isinstance(item, item_type):
            _fail(f"{where}[{i}]", f"expected a {item_type.__name__}, got {_kind(item)}")
        items.append(item)
    return tuple(items)


def _usages(value: object) -> tuple[TokenUsage, ...]:
    if isinstance(value, TokenUsage):
        return (value,)
    if not _is_sequence(value):
        _fail("usage", f"expected a TokenUsage or a list of them, got {_kind(value)}")
    usages = _items("usage", value, TokenUsage)
    if not usages:
        _fail("usage", "no token usage reported")
    return usages


def _note_ids(value: object, request: GenerationRequest) -> tuple[str, ...]:
    where = "incorporated_note_ids"
    if not _is_sequence(value):
        _fail(where, f"expected a list of note ids, got {_kind(value)}")
    pending = {note.id for note in request.planning_notes}
    seen: dict[str, None] = {}
    for i, note_id in enumerate(value):
        if not isinstance(note_id, str):
            _fail(f"{where}[{i}]", f"expected a string, got {_kind(note_id)}")
        if note_id not in pending:
            _fail(where, f"{_quote(note_id)} is not a pending planning note of this project")
        seen.setdefault(note_id)
    return tuple(seen)


# --------------------------------------------------------------------------------------------
# Helpers


def _is_sequence(value: object) -> TypeGuard[Sequence[object]]:
    # A str is a Sequence too, but a title where a list was expected is a bug, not a list.
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _quote(value: str) -> str:
    if len(value) > _SHOWN_CHARS:
        value = value[: _SHOWN_CHARS - 1] + "…"
    return repr(value)


def _fail(where: str, problem: str, *, joiner: str = ": ") -> NoReturn:
    raise InvalidOutputError(f"{where}{joiner}{problem}", field=where)
