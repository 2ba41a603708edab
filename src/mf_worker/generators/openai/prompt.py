"""The `openai` generator's prompt: the chat messages for a request, and their token bound.

The system prompt and the repair instructions are package resources (``prompts/system.txt``,
``prompts/repair.txt``) so they can be edited as text. Each input is capped (the brief, notes,
memories, earlier episodes) so a long brief cannot crowd out the answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Final

from mf_worker.generation.api import GenerationRequest
from mf_worker.scheduling.cadence import CadenceError, parse_cadence

from ._text import inline, shorten

__all__ = [
    "build_messages",
    "describe_cadence",
    "repair_prompt",
    "system_prompt",
    "upper_bound_tokens",
]

MESSAGE_OVERHEAD_TOKENS: Final = 8  # chat-template tokens around one message (generous)
_REQUEST_OVERHEAD_TOKENS: Final = 16

# How much of each input goes into the prompt, so a long brief cannot crowd out the answer.
_BRIEF_CHARS: Final = 2_000
_NOTE_CHARS: Final = 500
_MEMORY_CHARS: Final = 300
_PREVIOUS_TITLE_CHARS: Final = 150
_PREVIOUS_SUMMARY_CHARS: Final = 280
_PROMPT_NOTES: Final = 20
_PROMPT_MEMORIES: Final = 15
_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
                    "Sunday")
_JS_DAYS: Final = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                   "Saturday")
_MONTHS: Final = ("January", "February", "March", "April", "May", "June", "July", "August",
                  "September", "October", "November", "December")


@cache
def _prompt_resource(name: str) -> str:
    package = resources.files(__package__ or "mf_worker.generators.openai")
    return package.joinpath("prompts", name).read_text(encoding="utf-8").strip()


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
        f"Project: {inline(project.title, 200) or 'Untitled project'}",
        f"Brief: {inline(project.description, _BRIEF_CHARS) or '(no brief given)'}",
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
            summary = inline(episode.summary, _PREVIOUS_SUMMARY_CHARS)
            lines.append(f"- Episode {episode.sequence_number}: "
                         f"{inline(episode.title, _PREVIOUS_TITLE_CHARS)}"
                         + (f" — {summary}" if summary else ""))
    else:
        lines.append("- none: this is the first episode")
    lines += ["", "What we remember about the reader:"]
    memories = sorted(request.memories, key=lambda m: -m.importance)[:_PROMPT_MEMORIES]
    if memories:
        lines += [f"- ({m.memory_type}, importance {m.importance:.1f}) "
                  f"{inline(m.content, _MEMORY_CHARS)}" for m in memories]
    else:
        lines.append("- nothing yet")
    lines += ["", "The reader's pending planning notes (cover them if you can; list the ids "
                  "you used in used_note_ids):"]
    notes = request.planning_notes[:_PROMPT_NOTES]
    if notes:
        lines += [f"- id {note.id}: {inline(note.note, _NOTE_CHARS)}" for note in notes]
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
        return shorten(json.dumps(config, default=str, sort_keys=True), 120)
    if cadence.mode == "daily":
        return "daily"
    if cadence.mode == "weekdays":
        return "every weekday (Monday to Friday)"
    days = [_JS_DAYS[d] for d in sorted(cadence.allowed_js_days())]
    return f"{'weekly' if cadence.mode == 'weekly' else 'on certain days'}, on {', '.join(days)}"


def upper_bound_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """The most tokens ``messages`` can be: a byte-level tokenizer never makes more tokens than
    the text has UTF-8 bytes, plus the chat template's overhead per message."""
    return _REQUEST_OVERHEAD_TOKENS + sum(
        len(m["content"].encode("utf-8", "surrogatepass")) + MESSAGE_OVERHEAD_TOKENS
        for m in messages
    )

