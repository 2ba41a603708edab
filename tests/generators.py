"""A scripted generator for engine tests: the project's title says how the generation behaves.

Real worker processes load it as ``tests.generators:scripted``, so one daemon can meet every
scenario in one run. A fake that really behaves (sleeps, fails, returns garbage), not a mock.

Title prefixes:
  ``slow:S``        sleep S seconds, then write the template episode
  ``slow-once:S``   sleep S seconds on attempt 1 only (a crashed or frozen first attempt)
  ``flaky:N``       retryable failure on attempts 1..N, then success
  ``rate-limited[:S]``  retryable failure with retry_after=S (default 0.1) on attempt 1,
                    then success
  ``fail-always``   retryable failure on every attempt
  ``permanent``     permanent failure
  ``raises``        an unexpected exception (a plugin bug)
  ``unreachable``   the provider's host refuses the connection (``ConnectionRefusedError``)
  ``invalid:KIND``  an invalid result of KIND (see ``INVALID``)
  ``costly:S``      sleep S seconds, then report gpt-4o usage costing exactly £0.50
  ``costly-invalid`` an invalid result (empty title) that reports £0.50 of gpt-4o usage: a
                    billed call whose output fails validation
  ``costly-refused`` a permanent error that carries £0.50 of usage (the model refused, billed)
  ``wedge:S``       block the whole event loop for S seconds (a plugin calling sync I/O)
  ``together:N``    wait until N ``together`` generations are running in this process, then
                    all return the template episode at once (items that reach the final
                    write in one wave, as a busy worker's do)
  anything else     the template episode at once
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import cast

from mf_worker.generation import (
    BlockDraft,
    GenerationRequest,
    GenerationResult,
    PermanentGenerationError,
    RetryableGenerationError,
    TokenUsage,
)
from mf_worker.generators.template import TemplateGenerator

_template = TemplateGenerator()


def _good(request: GenerationRequest) -> GenerationResult:
    return _template.write(request)


def _replace(result: GenerationResult, **changes: object) -> GenerationResult:
    return dataclasses.replace(result, **changes)  # type: ignore[arg-type]


def _not_a_result() -> GenerationResult:
    """A plugin that breaks the API's contract by returning a string: the engine must fail the
    item, not crash. The cast is the contract being broken on purpose."""
    return cast(GenerationResult, "just a string")


INVALID: dict[str, Callable[[GenerationResult], GenerationResult]] = {
    "empty-title": lambda r: _replace(r, title="   "),
    "no-blocks": lambda r: _replace(r, blocks=[]),
    "nul": lambda r: _replace(r, blocks=[BlockDraft(content="bad\x00byte")]),
    "confidence-7": lambda r: _replace(r, blocks=[BlockDraft(content="x", confidence=7.0)]),
    "confidence-nan": lambda r: _replace(
        r, blocks=[BlockDraft(content="x", confidence=float("nan"))]),
    "negative-tokens": lambda r: _replace(
        r, usage=TokenUsage(model="template", prompt_tokens=-5, completion_tokens=1)),
    "huge": lambda r: _replace(r, blocks=[BlockDraft(content="x" * (2 * 1024 * 1024))]),
    "foreign-note": lambda r: _replace(r, incorporated_note_ids=["note_of_someone_else"]),
    "not-a-result": lambda r: _not_a_result(),
}


_together: list[asyncio.Event] = []


async def _wait_for_company(size: int) -> None:
    arrived = asyncio.Event()
    _together.append(arrived)
    if len(_together) >= size:
        for event in _together:
            event.set()
        _together.clear()
    await asyncio.wait_for(arrived.wait(), timeout=30)


async def scripted(request: GenerationRequest) -> GenerationResult:
    title = request.project.title
    kind, _, arg = title.partition(":")
    if kind == "together":
        await _wait_for_company(int(arg.split()[0]))
    elif kind == "slow" or (kind == "slow-once" and request.attempt == 1):
        await asyncio.sleep(float(arg.split()[0]))
    elif kind == "flaky" and request.attempt <= int(arg.split()[0]):
        raise RetryableGenerationError(f"provider overloaded (attempt {request.attempt})")
    elif kind == "rate-limited" and request.attempt == 1:
        raise RetryableGenerationError("429 Too Many Requests",
                                       retry_after=float(arg.split()[0]) if arg else 0.1)
    elif kind == "fail-always":
        raise RetryableGenerationError(f"upstream 503 on attempt {request.attempt}")
    elif kind == "permanent":
        raise PermanentGenerationError("400 Bad Request: content refused")
    elif kind == "raises":
        raise KeyError("choices")
    elif kind == "unreachable":
        raise ConnectionRefusedError(111, "Connection refused")
    elif kind == "invalid":
        return INVALID[arg.split()[0]](_good(request))
    elif kind == "wedge":
        time.sleep(float(arg.split()[0]))  # noqa: ASYNC251 - deliberately blocks the loop
    elif kind == "costly-invalid":
        return _replace(_good(request), title="  ", usage=TokenUsage("gpt-4o", 125_000, 31_250))
    elif kind == "costly-refused":
        raise PermanentGenerationError("the model refused",
                                       usages=[TokenUsage("gpt-4o", 125_000, 31_250)])
    elif kind == "costly":
        await asyncio.sleep(float(arg.split()[0]))
        # gpt-4o at £2.00 / £8.00 per million: 0.25 + 0.25 = £0.50, the default reserve.
        return _replace(_good(request), usage=TokenUsage("gpt-4o", 125_000, 31_250))
    return _good(request)


async def sleepy(request: GenerationRequest) -> GenerationResult:
    """Sleeps TEST_GENERATOR_SLEEP seconds (default 0.2): an LLM call's latency with no CPU."""
    await asyncio.sleep(float(os.environ.get("TEST_GENERATOR_SLEEP", "0.2")))
    return _good(request)
