"""`DigestGenerator`: the smallest generator that does everything a real one must.

* It is a class mf-worker builds from the entry point, passing ``settings=`` (mf-worker's one
  settings object); its own variable is declared in `DigestSettings` and parsed by mf-worker's
  settings parser, never read from the environment here.
* `generate` is `async def` and returns a `GenerationResult` with a title, blocks, the token
  usage it "spent", the ids of the planning notes it used and a memory it wants kept.
* It fails on purpose the two ways the worker understands: `PermanentGenerationError` when
  retrying cannot help, `RetryableGenerationError` (with `retry_after`) when it can.
* `estimate_max_usage` gives the worst case up front, so cost control reserves a real bound.

Everything is imported from `mf_worker.generation`, the only stable API of mf-worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mf_worker.generation import (
    BlockDraft,
    GenerationRequest,
    GenerationResult,
    MemoryDraft,
    PermanentGenerationError,
    RetryableGenerationError,
    Settings,
    TokenUsage,
    choice,
    setting,
)

MODEL = "example-digest"
STYLES = ("prose", "bullets")
_CHARS_PER_TOKEN = 4
# Every quoted input is capped, so the text written is at most ~2,400 characters (600 tokens).
_MAX_OUTPUT_TOKENS = 1_000


@dataclass(frozen=True, slots=True)
class DigestSettings:
    """This plugin's settings (registered under the ``mf_worker.settings`` entry point)."""

    style: str = setting(
        "EXAMPLE_DIGEST_STYLE", "prose", choice(*STYLES),
        "`example` generator: `prose` or `bullets` for the notes section.",
    )


class DigestGenerator:
    """Writes a short digest episode from the brief, the pending notes and earlier episodes."""

    def __init__(self, *, settings: Settings | None = None) -> None:
        # Configuration is read once, at start-up: a bad value stops the worker before it
        # takes any queue item, naming the variable. Without settings: the defaults.
        config = settings.plugin(DigestSettings) if settings else DigestSettings()
        self.style = config.style

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Write the episode for `request` (no network, so it never awaits anything)."""
        project = request.project
        if not project.description.strip():
            # Retrying cannot fix an empty brief: fail the item at once, with a reason.
            raise PermanentGenerationError("the project has no brief to write about")
        if project.title.startswith("busy:"):
            # How a plugin reports a transient failure, e.g. a provider's HTTP 429.
            raise RetryableGenerationError("example backend busy", retry_after=30)

        notes = request.planning_notes[:5]
        blocks = [
            BlockDraft(
                f"### Where we are\n\n{project.description.strip()[:500]}",
                reasoning="Restates the brief so the episode stands on its own.",
                confidence=0.9,
            )
        ]
        if request.previous_episodes:
            last = max(request.previous_episodes, key=lambda e: e.sequence_number)
            blocks.append(BlockDraft(
                f"### Since last time\n\nEpisode {last.sequence_number}, “{last.title[:200]}”, "
                "left open questions that this one follows up.",
                reasoning="Builds on the latest earlier episode instead of repeating it.",
                confidence=0.6,
            ))
        if notes:
            if self.style == "bullets":
                text = "\n".join(f"- {note.note.strip()[:200]}" for note in notes)
            else:
                text = "You asked about " + "; ".join(n.note.strip()[:200] for n in notes) + "."
            blocks.append(BlockDraft(f"### Your notes\n\n{text}",
                                     reasoning=f"Covers {len(notes)} pending note(s).",
                                     confidence=0.8))
        title = f"{project.title.strip()[:200]} — {request.local_date:%d %B %Y}"

        written = len(title) + sum(len(b.content) + len(b.reasoning or "") for b in blocks)
        return GenerationResult(
            title=title,
            blocks=blocks,
            usage=TokenUsage(MODEL, _tokens(_prompt_chars(request)), _tokens(written)),
            incorporated_note_ids=[note.id for note in notes],
            new_memories=[
                MemoryDraft(f"Asked about: {notes[0].note.strip()[:200]}", importance=0.6)
            ] if notes else [],
        )

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        """The most `generate(request)` can use: the whole prompt plus the output cap."""
        return TokenUsage(MODEL, _tokens(_prompt_chars(request)), _MAX_OUTPUT_TOKENS)


def _prompt_chars(request: GenerationRequest) -> int:
    """What a model would have read: the brief, the notes and the earlier titles."""
    parts = [request.project.title, request.project.description]
    parts += [note.note for note in request.planning_notes]
    parts += [episode.title for episode in request.previous_episodes]
    return sum(len(part) for part in parts)


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / _CHARS_PER_TOKEN))
