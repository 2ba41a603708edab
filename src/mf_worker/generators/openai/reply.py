"""The `openai` generator's reply parser: from the model's text to an episode, tolerantly.

Pure functions of the reply text (and of the request, for the pending note ids), so they are
unit-tested without HTTP. `parse_reply` finds the JSON object in a reply (code fences, prose
around it, trailing commas, Python-style literals); `interpret` turns it into the episode's
parts or says, as a `ReplyError`, why it cannot; `salvage_reply` keeps the complete part of an
object that was cut off at ``max_tokens`` or broke part-way — the last resort after the one
repair turn (`salvaged`).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from mf_worker.errors import MfWorkerError
from mf_worker.generation.api import BlockDraft, GenerationRequest, MemoryDraft
from mf_worker.generation.validate import MAX_TITLE_CHARS
from mf_worker.logs import get_logger

from ._text import clean, inline, shorten

__all__ = ["Parsed", "ReplyError", "interpret", "parse_reply", "salvage_reply", "salvaged"]

_MAX_MEMORIES: Final = 10  # new memories kept from one reply
_SALVAGE_TRIES: Final = 200  # cut points tried, from the last one back


def _logger() -> Any:
    # Looked up per use: a logger bound at import would keep the logging set-up of that moment.
    return get_logger("mf_worker.generation.openai")


class ReplyError(ValueError, MfWorkerError):
    """The model's reply is not the requested JSON; `reason` says why (no reply text in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Parsed:
    """What an episode reply holds: its title, sections, the note ids used, new memories."""

    title: str
    blocks: tuple[BlockDraft, ...]
    note_ids: tuple[str, ...]
    memories: tuple[MemoryDraft, ...]



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




def salvaged(content: str, finish_reason: str | None, call: str, request: GenerationRequest
             ) -> Parsed | None:
    """The episode in the complete part of a cut-off reply, if it has a title and a section."""
    obj = salvage_reply(content)
    if obj is None:
        return None
    try:
        parsed = interpret(obj, request)
    except ReplyError:
        return None
    _logger().warning("llm_reply_salvaged", call=call, finish_reason=finish_reason,
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


def interpret(obj: dict[str, Any], request: GenerationRequest) -> Parsed:
    """Turn the reply's object into the episode; `ReplyError` if it lacks a title or text."""
    if not any(key in obj for key in ("title", "sections")):
        nested = [v for v in obj.values() if isinstance(v, dict) and "title" in v]
        if len(nested) == 1:
            obj = nested[0]  # {"episode": {...}}
    title = _first_text(obj, _TITLE_KEYS)
    title = re.sub(r"^#+\s*", "", inline(title, 10 * MAX_TITLE_CHARS))
    if not title:
        raise ReplyError('the JSON object has no "title" string')
    if len(title) > MAX_TITLE_CHARS:
        title = shorten(title, MAX_TITLE_CHARS)

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
                          note_ids=[shorten(i, 40) for i in dropped[:10]])

    return Parsed(title=title, blocks=blocks, note_ids=used,
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
                content = f"### {inline(heading, 200)}\n\n{content}"
            reason = section.get("reasoning")
            reasoning = clean(reason).strip() if isinstance(reason, str) else None
            confidence = _unit(section.get("confidence"))
        else:
            continue
        content = clean(content).strip()
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
            memory_type = inline(kind, 50) if isinstance(kind, str) else "preference"
            unit = _unit(entry.get("importance"))
            importance = 0.5 if unit is None else unit
        else:
            continue
        content = clean(content).strip()
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
