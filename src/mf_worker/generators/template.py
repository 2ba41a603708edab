"""The built-in `template` generator: a real-looking episode with no model behind it.

It exists so the whole pipeline (scheduling, generation, validation, storage, notification,
budgets) can run in development, demos, CI and benchmarks without network access or an API
key. It is deterministic: the text depends only on the request's content (project, episode
number, notes, memories, previous episodes), never on the clock, the attempt number or a
random source, so a retried item produces the same episode and tests can compare output.
It is also cheap (a few string operations), because benchmarks run it hundreds of times a
second.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from datetime import date

from mf_worker.generation.api import (
    BlockDraft,
    GenerationRequest,
    GenerationResult,
    MemoryDraft,
    PlanningNote,
    TokenUsage,
)

__all__ = ["TemplateGenerator"]

MODEL = "template"
_CHARS_PER_TOKEN = 4

# Caps on how much of each input is quoted, so output size is bounded (see estimate_max_usage).
_PROJECT_TITLE_CHARS = 120
_BRIEF_CHARS = 280
_NOTE_CHARS = 200
_NOTE_IN_MEMORY_CHARS = 80
_MEMORY_DRAFT_CHARS = 480
_PREVIOUS_TITLE_CHARS = 100
_PREVIOUS_SUMMARY_CHARS = 200
_MEMORY_CHARS = 120
_SHOWN_PREVIOUS = 3
_SHOWN_MEMORIES = 3
_SHOWN_KEYWORDS = 3
_KEYWORD_SCAN_CHARS = 2_000

# Upper bounds of the generated text, in characters, used by estimate_max_usage: everything
# that does not scale with the number of notes, and what each note adds. Generous on purpose;
# tests check them against worst-case inputs.
_FIXED_COMPLETION_CHARS = 6_000
_PER_NOTE_COMPLETION_CHARS = 2 * _NOTE_CHARS + _NOTE_IN_MEMORY_CHARS
_PROMPT_OVERHEAD_CHARS = 600  # the instructions a real model would get
_PROMPT_ITEM_OVERHEAD_CHARS = 16  # labels and separators around each quoted item

_THEMES = (
    "the turning points",
    "quiet shifts",
    "what moved this week",
    "signals and noise",
    "a momentum check",
    "the long view",
    "pressure points",
    "what comes next",
)
_SIGNAL_ANGLES = (
    "watch whether the early movement holds or fades",
    "look for who is quietly changing their position",
    "compare the headline numbers with what people actually do",
    "note any deadline that is closer than it looks",
    "check which assumption the others depend on",
    "see who benefits if nothing changes",
)
_NEXT_STEP_IDEAS = (
    "Pick one signal above and note what would change your mind about it.",
    "Write down the question you most want the next episode to answer.",
    "Share this episode with someone who disagrees and collect their view.",
    "Mark a date to check whether the trend you expect actually showed up.",
)
_STOPWORDS = frozenset((
    "about", "above", "after", "again", "against", "among", "because", "before", "being",
    "below", "between", "brief", "could", "during", "episode", "episodes", "every", "first",
    "following", "future", "futures", "might", "monitoring", "other", "project", "should",
    "their", "there", "these", "those", "through", "tracking", "under", "until", "watching",
    "where", "which", "while", "would",
))  # fmt: skip
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
_WORD = re.compile(r"[^\W\d_][\w-]{4,}")


class TemplateGenerator:
    """Writes a markdown episode from the brief, the notes, the memories and past titles.

    Every pending planning note is incorporated (all ids are returned and each note is quoted
    in the "Your notes" block), and when there were notes, one memory recording what the
    reader asked for is proposed. Token usage is reported as if a model had read the inputs
    and written the output, at four characters per token, under the model name "template".
    """

    __slots__ = ()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Write the episode; never awaits anything, never fails on well-formed requests."""
        return self.write(request)

    def write(self, request: GenerationRequest) -> GenerationResult:
        """The synchronous core of `generate`, for callers without an event loop."""
        seed = _seed(request)
        notes = request.planning_notes
        theme = _THEMES[seed % len(_THEMES)]
        project_title = _inline(request.project.title, _PROJECT_TITLE_CHARS) or "Untitled project"
        title = f"{project_title} — Episode {request.episode_number}: {theme}"

        blocks = [
            _what_changed(request, project_title),
            _signals(request, seed),
        ]
        if notes:
            blocks.append(_your_notes(notes))
        blocks.append(_next_steps(request, seed))

        memories: tuple[MemoryDraft, ...] = ()
        if notes:
            asked = "; ".join(_inline(note.note, _NOTE_IN_MEMORY_CHARS) for note in notes)
            memories = (
                MemoryDraft(
                    content=_shorten(f"Reader asked for: {asked}", _MEMORY_DRAFT_CHARS),
                    memory_type="preference",
                    importance=0.6,
                ),
            )

        written = len(title) + sum(
            len(block.content) + len(block.reasoning or "") for block in blocks
        )
        written += sum(len(memory.content) for memory in memories)
        usage = TokenUsage(
            model=MODEL,
            prompt_tokens=_tokens(_prompt_chars(request)),
            completion_tokens=_tokens(written),
        )
        return GenerationResult(
            title=title,
            blocks=tuple(blocks),
            usage=usage,
            incorporated_note_ids=tuple(dict.fromkeys(note.id for note in notes)),
            new_memories=memories,
        )

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        """An upper bound of `generate(request)`'s usage, without writing the episode.

        The prompt side is exact (the same count `generate` reports); the completion side
        adds the fixed template text, the capped quotes and a fixed amount per planning note.
        """
        digits = len(str(request.episode_number)) + len(str(request.episode_number + 1))
        completion = (
            _FIXED_COMPLETION_CHARS
            + 4 * digits
            + _PER_NOTE_COMPLETION_CHARS * len(request.planning_notes)
        )
        return TokenUsage(
            model=MODEL,
            prompt_tokens=_tokens(_prompt_chars(request)),
            completion_tokens=_tokens(completion),
        )


# --------------------------------------------------------------------------------------------
# Blocks


def _what_changed(request: GenerationRequest, project_title: str) -> BlockDraft:
    brief = _inline(request.project.description, _BRIEF_CHARS)
    lines = [
        "### What changed",
        "",
        f"Episode {request.episode_number} of *{project_title}*, "
        f"for {_long_date(request.local_date)}.",
    ]
    if brief:
        lines += ["", f"> {brief}"]
    previous = sorted(request.previous_episodes, key=lambda ep: ep.sequence_number, reverse=True)
    previous = previous[:_SHOWN_PREVIOUS]
    if previous:
        last = previous[0]
        summary = _inline(last.summary, _PREVIOUS_SUMMARY_CHARS)
        lines += [
            "",
            f"Last time, in “{_inline(last.title, _PREVIOUS_TITLE_CHARS)}”"
            f" (episode {last.sequence_number}): {summary or 'no summary was kept'}",
        ]
        if len(previous) > 1:
            earlier = ", ".join(
                f"“{_inline(ep.title, _PREVIOUS_TITLE_CHARS)}”" for ep in previous[1:]
            )
            lines.append(f"Before that: {earlier}. This episode picks up where they left off.")
        reasoning = (
            f"Anchored on the brief and the last {len(previous)} episode(s) to avoid repeats."
        )
        confidence = 0.85
    else:
        lines += ["", "This is the first episode, so it starts from the brief itself."]
        reasoning = "No earlier episodes, so the brief is the only anchor."
        confidence = 0.75
    return BlockDraft("\n".join(lines), reasoning=reasoning, confidence=confidence)


def _signals(request: GenerationRequest, seed: int) -> BlockDraft:
    keywords = _keywords(request.project.description) or _keywords(request.project.title)
    if not keywords:
        keywords = ["the people involved", "the numbers", "the timeline"]
    lines = ["### Signals to watch", ""]
    for i, keyword in enumerate(keywords):
        angle = _SIGNAL_ANGLES[(seed + i) % len(_SIGNAL_ANGLES)]
        lines.append(f"- **{keyword}**: {angle}.")
    memories = sorted(request.memories, key=lambda m: (-m.importance, m.content))
    memories = memories[:_SHOWN_MEMORIES]
    if memories:
        remembered = "; ".join(_inline(m.content, _MEMORY_CHARS) for m in memories)
        lines += ["", f"Tuned to what you told us before: {remembered}."]
        reasoning = (
            f"Took recurring terms from the brief and weighted {len(memories)} remembered "
            "preference(s)."
        )
    else:
        reasoning = "Took recurring terms from the brief; no reader preferences are known yet."
    confidence = round(0.55 + 0.05 * len(memories) + 0.01 * (seed % 5), 2)
    return BlockDraft("\n".join(lines), reasoning=reasoning, confidence=confidence)


def _your_notes(notes: Sequence[PlanningNote]) -> BlockDraft:
    lines = ["### Your notes", "", "You asked for this episode to cover:", ""]
    lines += [f"- {_inline(note.note, _NOTE_CHARS) or '(an empty note)'}" for note in notes]
    lines += ["", "Each of these is folded into the signals and next steps of this episode."]
    count = len(notes)
    return BlockDraft(
        "\n".join(lines),
        reasoning=f"Incorporated all {count} pending planning note{'s' if count != 1 else ''}.",
        confidence=0.9,
    )


def _next_steps(request: GenerationRequest, seed: int) -> BlockDraft:
    lines = ["### Next steps", ""]
    if request.planning_notes:
        first = _inline(request.planning_notes[0].note, _NOTE_IN_MEMORY_CHARS)
        lines.append(f"1. Follow up on your note “{first}” as new facts come in.")
    else:
        lines.append("1. Leave a planning note if there is something you want covered.")
    lines.append(f"2. {_NEXT_STEP_IDEAS[seed % len(_NEXT_STEP_IDEAS)]}")
    lines.append(f"3. Episode {request.episode_number + 1} builds on this one; reply to steer it.")
    return BlockDraft(
        "\n".join(lines),
        reasoning="Turned the signals into a few concrete actions for the reader.",
        confidence=0.7,
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _seed(request: GenerationRequest) -> int:
    # Project and episode only: retries (attempt, queue item) must produce the same episode.
    key = f"{request.project.id}\x1f{request.episode_number}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _prompt_chars(request: GenerationRequest) -> int:
    """Size of the prompt a model-backed generator would send for this request."""
    project = request.project
    items = [project.title, project.description]
    items += [note.note for note in request.planning_notes]
    items += [memory.content for memory in request.memories]
    for episode in request.previous_episodes:
        items += [episode.title, episode.summary]
    return _PROMPT_OVERHEAD_CHARS + sum(len(item) + _PROMPT_ITEM_OVERHEAD_CHARS for item in items)


def _tokens(chars: int) -> int:
    return math.ceil(chars / _CHARS_PER_TOKEN)


def _keywords(text: str) -> list[str]:
    """The most frequent long words of `text` (ties: first seen first), capitalised."""
    counts: dict[str, int] = {}
    for match in _WORD.finditer(text[:_KEYWORD_SCAN_CHARS]):
        word = match.group().strip("-").lower()
        if len(word) >= 5 and word not in _STOPWORDS:
            counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts, key=lambda word: -counts[word])  # stable: keeps first-seen order
    return [word[:1].upper() + word[1:40] for word in ranked[:_SHOWN_KEYWORDS]]


def _inline(text: str, limit: int) -> str:
    """`text` on one line (whitespace collapsed, NUL dropped), at most `limit` characters."""
    return _shorten(" ".join(text.replace("\x00", " ").split()), limit)


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + "…"


def _long_date(day: date) -> str:
    # Not strftime: month and weekday names would follow the process locale.
    return f"{_WEEKDAYS[day.weekday()]} {day.day} {_MONTHS[day.month - 1]} {day.year}"
