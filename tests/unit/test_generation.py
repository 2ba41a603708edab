"""Tests for mf_worker.generation: the plugin types, result validation, the loader, `template`.

No database: everything here is plain objects and an event loop per test (`asyncio.run`).
Sample plugins live in `plugin_samples.py` next to this file and are loaded through
`plugin_samples:<name>` specs, the way an operator's own module would be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import math
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from importlib.metadata import EntryPoint, EntryPoints
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mf_worker import plugins as plugins_module
from mf_worker.errors import MfWorkerError
from mf_worker.generation import (
    ENTRY_POINT_GROUP,
    BlockDraft,
    FunctionGenerator,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    InvalidOutputError,
    Memory,
    MemoryDraft,
    PermanentGenerationError,
    PlanningNote,
    PluginLoadError,
    PreviousEpisode,
    ProjectInfo,
    RetryableGenerationError,
    TokenUsage,
    UsageEstimator,
    available_generators,
    estimate_max_usage,
    load_generator,
    validate_result,
)
from mf_worker.generators.template import TemplateGenerator

HERE = Path(__file__).resolve().parent
MIB = 1_048_576


def make_request(
    *,
    notes: tuple[PlanningNote, ...] = (
        PlanningNote("n1", "Cover the new Chilean royalty law"),
        PlanningNote("n2", "More on battery\nrecycling startups, please"),
    ),
    memories: tuple[Memory, ...] = (Memory("Prefers short bullet points", importance=0.9),),
    previous: tuple[PreviousEpisode, ...] = (
        PreviousEpisode(3, "Refineries wake up", "Permits moved faster than expected."),
        PreviousEpisode(2, "Prices slide", "Spot prices fell ten percent."),
    ),
    title: str = "Lithium 2030",
    description: str = "Lithium supply chains, battery recycling and refinery permits.",
    episode_number: int = 4,
    attempt: int = 1,
    queue_item_id: str = "q_1",
) -> GenerationRequest:
    return GenerationRequest(
        queue_item_id=queue_item_id,
        attempt=attempt,
        organization_id="org_1",
        project=ProjectInfo(
            id="prj_1",
            title=title,
            description=description,
            cadence_config={"frequency": "weekly"},
            timezone="Europe/Berlin",
        ),
        episode_number=episode_number,
        scheduled_for=datetime(2025, 3, 3, 7, 0, tzinfo=UTC),
        local_date=date(2025, 3, 3),
        planning_notes=notes,
        memories=memories,
        previous_episodes=previous,
        idempotency_key=f"{queue_item_id}:episode",
    )


def generate(generator: Generator, request: GenerationRequest) -> GenerationResult:
    return asyncio.run(generator.generate(request))


# --------------------------------------------------------------------------------------------
# Types


def test_request_converts_lists_to_tuples_so_it_is_really_immutable() -> None:
    request = dataclasses.replace(make_request(), planning_notes=[PlanningNote("a", "b")])  # type: ignore[arg-type]
    assert request.planning_notes == (PlanningNote("a", "b"),)
    hash(request)  # usable as a cache key despite the cadence dict


@pytest.mark.parametrize(
    "scheduled_for",
    [datetime(2025, 3, 3, 7), datetime(2025, 3, 3, 7, tzinfo=timezone(timedelta(hours=1)))],
    ids=["naive", "not-utc"],
)
def test_request_rejects_a_scheduled_for_that_is_not_utc_aware(scheduled_for: datetime) -> None:
    with pytest.raises(ValueError, match="scheduled_for"):
        dataclasses.replace(make_request(), scheduled_for=scheduled_for)


def test_request_rejects_an_attempt_that_is_not_1_based() -> None:
    with pytest.raises(ValueError, match="attempt"):
        make_request(attempt=0)


def test_result_usages_normalises_one_usage_or_a_list_to_a_tuple() -> None:
    one = TokenUsage("m", 3, 4)
    two = TokenUsage("n", 1, 1)
    assert one.total_tokens == 7
    assert GenerationResult("t", [BlockDraft("c")], one).usages == (one,)
    assert GenerationResult("t", [BlockDraft("c")], [one, two]).usages == (one, two)


def test_error_hierarchy_lets_callers_branch_on_type() -> None:
    assert issubclass(GenerationError, MfWorkerError)
    assert issubclass(RetryableGenerationError, GenerationError)
    assert issubclass(PermanentGenerationError, GenerationError)
    assert issubclass(InvalidOutputError, PermanentGenerationError)
    assert not issubclass(RetryableGenerationError, PermanentGenerationError)


@pytest.mark.parametrize(
    ("given", "kept"),
    [(None, None), (2.5, 2.5), (3, 3.0), (-1.0, None), (math.nan, None), (math.inf, None)],
)
def test_retry_after_keeps_sane_delays_and_drops_nonsense(
    given: float | None, kept: float | None
) -> None:
    assert RetryableGenerationError("rate limited", retry_after=given).retry_after == kept


def test_errors_survive_pickling_with_their_extra_fields() -> None:
    retry = pickle.loads(pickle.dumps(RetryableGenerationError("429", retry_after=12.0)))
    assert (str(retry), retry.retry_after) == ("429", 12.0)
    invalid = pickle.loads(pickle.dumps(InvalidOutputError("title: empty", field="title")))
    assert (str(invalid), invalid.field) == ("title: empty", "title")


# --------------------------------------------------------------------------------------------
# The template generator


def test_template_is_deterministic_and_ignores_attempt_and_queue_item() -> None:
    """Same content → same episode, also on a retry (attempt, queue item and key differ)."""
    first = generate(TemplateGenerator(), make_request())
    again = generate(TemplateGenerator(), make_request())
    retry = generate(TemplateGenerator(), make_request(attempt=3, queue_item_id="q_other"))
    assert first == again == retry


def test_template_varies_with_the_episode() -> None:
    assert generate(TemplateGenerator(), make_request(episode_number=4)) != generate(
        TemplateGenerator(), make_request(episode_number=5)
    )


def test_template_incorporates_every_note_and_passes_validation() -> None:
    request = make_request()
    result = validate_result(generate(TemplateGenerator(), request), request, max_episode_bytes=MIB)
    assert result.incorporated_note_ids == ("n1", "n2")
    text = "\n".join(block.content for block in result.blocks)
    assert "Cover the new Chilean royalty law" in text
    assert "More on battery recycling startups, please" in text  # newline collapsed
    assert len(result.new_memories) == 1
    memory = result.new_memories[0]
    assert memory.content.startswith("Reader asked for: ")
    assert "Chilean royalty law" in memory.content
    assert memory.importance == 0.6


def test_template_writes_a_titled_markdown_episode_of_two_to_four_blocks() -> None:
    for request in (make_request(), make_request(notes=(), memories=(), previous=())):
        result = generate(TemplateGenerator(), request)
        assert result.title.startswith("Lithium 2030 — Episode 4: ")
        assert 2 <= len(result.blocks) <= 4
        for block in result.blocks:
            assert block.content.startswith("### ")
            assert block.reasoning
            assert block.confidence is not None
            assert 0 <= block.confidence <= 1


def test_template_without_notes_proposes_no_memory_and_incorporates_nothing() -> None:
    request = make_request(notes=())
    result = validate_result(generate(TemplateGenerator(), request), request, max_episode_bytes=MIB)
    assert result.incorporated_note_ids == ()
    assert result.new_memories == ()
    assert not any(block.content.startswith("### Your notes") for block in result.blocks)


def test_template_reports_usage_from_input_and_output_size() -> None:
    small = generate(TemplateGenerator(), make_request(description="Short."))
    large = generate(TemplateGenerator(), make_request(description="Long brief. " * 500))
    (usage,) = small.usages
    assert usage.model == "template"
    assert usage.completion_tokens > 0
    assert large.usages[0].prompt_tokens > usage.prompt_tokens


def test_template_copes_with_empty_and_hostile_input() -> None:
    request = make_request(
        title="",
        description="",
        notes=(PlanningNote("n1", ""), PlanningNote("n2", "nul\x00inside")),
        memories=(Memory("  "),),
        previous=(PreviousEpisode(1, "", ""),),
    )
    result = validate_result(generate(TemplateGenerator(), request), request, max_episode_bytes=MIB)
    assert result.title.startswith("Untitled project — Episode 4")
    assert result.incorporated_note_ids == ("n1", "n2")


WORST_CASES = {
    "empty": make_request(notes=(), memories=(), previous=(), title="", description=""),
    "typical": make_request(),
    "long-everything": make_request(
        title="T" * 5_000,
        description="word " * 10_000,
        notes=tuple(PlanningNote(f"n{i}", "x" * 5_000) for i in range(50)),
        memories=tuple(Memory("m " * 2_000, importance=0.5) for _ in range(20)),
        previous=tuple(PreviousEpisode(i, "t" * 5_000, "s" * 5_000) for i in range(20)),
        episode_number=10**30,
    ),
    "many-long-words": make_request(
        description=" ".join(f"{'k' * 60}{chr(97 + i % 26)}" for i in range(400)),
        notes=(PlanningNote("n1", " ".join(["abcdefghij"] * 100)),),
    ),
}


@pytest.mark.parametrize("request_", WORST_CASES.values(), ids=WORST_CASES.keys())
def test_template_estimate_is_an_upper_bound_of_actual_usage(request_: GenerationRequest) -> None:
    generator = TemplateGenerator()
    estimate = estimate_max_usage(generator, request_)
    (actual,) = generate(generator, request_).usages
    assert estimate is not None
    assert estimate.model == "template"
    assert estimate.prompt_tokens >= actual.prompt_tokens
    assert estimate.completion_tokens >= actual.completion_tokens


def test_template_is_a_generator_with_a_usage_estimate() -> None:
    assert isinstance(TemplateGenerator(), Generator)
    assert isinstance(TemplateGenerator(), UsageEstimator)


# --------------------------------------------------------------------------------------------
# Validation

REQUEST = make_request()


def ok_result(**changes: Any) -> GenerationResult:
    base = GenerationResult(
        title="A title",
        blocks=[BlockDraft("one"), BlockDraft("two", "why", 0.5), BlockDraft("three")],
        usage=[TokenUsage("gpt", 10, 20)],
        incorporated_note_ids=["n1"],
        new_memories=[MemoryDraft("likes charts")],
    )
    return dataclasses.replace(base, **changes)


def test_validate_accepts_a_good_result_and_normalises_it() -> None:
    result = ok_result(
        usage=TokenUsage("gpt", 1, 2), incorporated_note_ids=["n2", "n1", "n2", "n1"]
    )
    checked = validate_result(result, REQUEST, max_episode_bytes=MIB)
    assert checked.incorporated_note_ids == ("n2", "n1")  # duplicates collapsed, order kept
    assert checked.usage == (TokenUsage("gpt", 1, 2),)
    assert isinstance(checked.blocks, tuple)
    assert isinstance(checked.new_memories, tuple)
    assert validate_result(checked, REQUEST, max_episode_bytes=MIB) == checked


def test_validate_accepts_boundary_values() -> None:
    result = ok_result(
        title="x" * 500,
        blocks=[BlockDraft("a", "", 0), BlockDraft("b", None, 1), BlockDraft("c", None, 1.0)],
        usage=[TokenUsage("m", 0, 0)],
        incorporated_note_ids=[],
        new_memories=[MemoryDraft("m", importance=0), MemoryDraft("n", importance=1)],
    )
    checked = validate_result(result, REQUEST, max_episode_bytes=MIB)
    # Accepted unchanged: nothing at a boundary is clamped, dropped or rounded away.
    assert checked.title == "x" * 500
    assert [(b.content, b.confidence) for b in checked.blocks] == [("a", 0), ("b", 1),
                                                                  ("c", 1.0)]
    assert checked.usage == (TokenUsage("m", 0, 0),)
    assert [m.importance for m in checked.new_memories] == [0, 1]
    # One step past each boundary is refused (so the values above really were the edges).
    for beyond in (ok_result(title="x" * 501),
                   ok_result(blocks=[BlockDraft("a", None, 1.0001)]),
                   ok_result(blocks=[BlockDraft("a", None, -0.0001)]),
                   ok_result(new_memories=[MemoryDraft("m", importance=1.0001)])):
        with pytest.raises(InvalidOutputError):
            validate_result(beyond, REQUEST, max_episode_bytes=MIB)


nan, inf = math.nan, math.inf
INVALID: dict[str, tuple[Callable[[], object], str, str]] = {
    # id: (make the bad result, expected field, expected message)
    "not-a-result": (lambda: {"title": "x"}, "result", "result: expected a GenerationResult"),
    "none-result": (lambda: None, "result", "got None"),
    "empty-title": (lambda: ok_result(title=""), "title", "title: empty"),
    "blank-title": (lambda: ok_result(title=" \n\t"), "title", "title: empty"),
    "long-title": (lambda: ok_result(title="x" * 501), "title", "title: 501 characters"),
    "title-not-str": (lambda: ok_result(title=42), "title", "title: expected a string, got int"),
    "nul-title": (lambda: ok_result(title="a\x00b"), "title", "title: contains a NUL byte"),
    "no-blocks": (lambda: ok_result(blocks=[]), "blocks", "blocks: no blocks"),
    "blocks-str": (lambda: ok_result(blocks="text"), "blocks", "blocks: expected a list"),
    "block-dict": (
        lambda: ok_result(blocks=[BlockDraft("a"), {"content": "b"}]),
        "blocks[1]",
        "blocks[1]: expected a BlockDraft, got dict",
    ),
    "empty-content": (
        lambda: ok_result(blocks=[BlockDraft("  ")]),
        "blocks[0].content",
        "blocks[0].content: empty",
    ),
    "nul-content": (
        lambda: ok_result(blocks=[BlockDraft("a\x00")]),
        "blocks[0].content",
        "blocks[0].content: contains a NUL byte",
    ),
    "surrogate-content": (
        lambda: ok_result(blocks=[BlockDraft("bad \ud800")]),
        "blocks[0].content",
        "blocks[0].content: not valid Unicode",
    ),
    "nul-reasoning": (
        lambda: ok_result(blocks=[BlockDraft("a", "why\x00")]),
        "blocks[0].reasoning",
        "blocks[0].reasoning: contains a NUL byte",
    ),
    "confidence-high": (
        lambda: ok_result(blocks=[BlockDraft("a"), BlockDraft("b"), BlockDraft("c", None, 7.0)]),
        "blocks[2].confidence",
        "blocks[2].confidence: 7.0 is outside 0..1",
    ),
    "confidence-negative": (
        lambda: ok_result(blocks=[BlockDraft("a", None, -0.1)]),
        "blocks[0].confidence",
        "-0.1 is outside 0..1",
    ),
    "confidence-nan": (
        lambda: ok_result(blocks=[BlockDraft("a", None, nan)]),
        "blocks[0].confidence",
        "blocks[0].confidence: nan is not a finite number",
    ),
    "confidence-inf": (
        lambda: ok_result(blocks=[BlockDraft("a", None, inf)]),
        "blocks[0].confidence",
        "inf is not a finite number",
    ),
    "confidence-bool": (
        lambda: ok_result(blocks=[BlockDraft("a", None, True)]),
        "blocks[0].confidence",
        "expected a number, got bool",
    ),
    "confidence-str": (
        lambda: ok_result(blocks=[BlockDraft("a", None, "0.5")]),  # type: ignore[arg-type]
        "blocks[0].confidence",
        "expected a number, got str",
    ),
    "no-usage": (lambda: ok_result(usage=[]), "usage", "usage: no token usage reported"),
    "usage-none": (lambda: ok_result(usage=None), "usage", "usage: expected a TokenUsage"),
    "usage-dict": (
        lambda: ok_result(usage=[TokenUsage("m", 1, 1), {"model": "m"}]),
        "usage[1]",
        "usage[1]: expected a TokenUsage, got dict",
    ),
    "negative-prompt": (
        lambda: ok_result(usage=[TokenUsage("m", -3, 1)]),
        "usage[0].prompt_tokens",
        "usage[0].prompt_tokens: -3 is negative",
    ),
    "float-completion": (
        lambda: ok_result(usage=TokenUsage("m", 1, 1.5)),  # type: ignore[arg-type]
        "usage[0].completion_tokens",
        "usage[0].completion_tokens: expected an int, got float",
    ),
    "bool-tokens": (
        lambda: ok_result(usage=TokenUsage("m", True, 1)),
        "usage[0].prompt_tokens",
        "expected an int, got bool",
    ),
    "empty-model": (
        lambda: ok_result(usage=[TokenUsage("m", 1, 1), TokenUsage(" ", 1, 1)]),
        "usage[1].model",
        "usage[1].model: empty",
    ),
    "unknown-note": (
        lambda: ok_result(incorporated_note_ids=["n1", "note_x"]),
        "incorporated_note_ids",
        "incorporated_note_ids: 'note_x' is not a pending planning note of this project",
    ),
    "note-ids-str": (
        lambda: ok_result(incorporated_note_ids="n1"),
        "incorporated_note_ids",
        "incorporated_note_ids: expected a list",
    ),
    "note-id-int": (
        lambda: ok_result(incorporated_note_ids=[5]),
        "incorporated_note_ids[0]",
        "incorporated_note_ids[0]: expected a string, got int",
    ),
    "memory-not-draft": (
        lambda: ok_result(new_memories=["likes charts"]),
        "new_memories[0]",
        "new_memories[0]: expected a MemoryDraft, got str",
    ),
    "memory-empty": (
        lambda: ok_result(new_memories=[MemoryDraft("")]),
        "new_memories[0].content",
        "new_memories[0].content: empty",
    ),
    "memory-nul": (
        lambda: ok_result(new_memories=[MemoryDraft("a\x00")]),
        "new_memories[0].content",
        "new_memories[0].content: contains a NUL byte",
    ),
    "memory-type-empty": (
        lambda: ok_result(new_memories=[MemoryDraft("a", memory_type="")]),
        "new_memories[0].memory_type",
        "new_memories[0].memory_type: empty",
    ),
    "memory-importance-high": (
        lambda: ok_result(new_memories=[MemoryDraft("a", importance=1.5)]),
        "new_memories[0].importance",
        "new_memories[0].importance: 1.5 is outside 0..1",
    ),
    "memory-importance-nan": (
        lambda: ok_result(new_memories=[MemoryDraft("a", importance=nan)]),
        "new_memories[0].importance",
        "is not a finite number",
    ),
}


@pytest.mark.parametrize(("make", "field", "message"), INVALID.values(), ids=INVALID.keys())
def test_validate_rejects_bad_output_naming_the_field(
    make: Callable[[], object], field: str, message: str
) -> None:
    """Each broken rule raises InvalidOutputError whose message starts at the offending path."""
    with pytest.raises(InvalidOutputError) as caught:
        validate_result(make(), REQUEST, max_episode_bytes=MIB)
    assert caught.value.field == field
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_validate_reports_episode_size_in_utf8_bytes_with_the_setting_name() -> None:
    result = ok_result(title="T", blocks=[BlockDraft("x" * 2_345_677)])
    with pytest.raises(InvalidOutputError) as caught:
        validate_result(result, REQUEST, max_episode_bytes=MIB)
    assert str(caught.value) == (
        "episode is 2,345,678 bytes, over the limit of 1,048,576 (MF_MAX_EPISODE_BYTES)"
    )
    assert caught.value.field == "episode"


def test_validate_counts_bytes_not_characters_and_includes_reasoning() -> None:
    # 1 + 2*300 + 200 = 801 bytes in 501 characters.
    result = ok_result(title="T", blocks=[BlockDraft("é" * 300, "r" * 200)])
    validate_result(result, REQUEST, max_episode_bytes=801)
    with pytest.raises(InvalidOutputError, match="episode is 801 bytes"):
        validate_result(result, REQUEST, max_episode_bytes=800)


def test_validate_messages_never_quote_long_content() -> None:
    with pytest.raises(InvalidOutputError) as caught:
        validate_result(
            ok_result(incorporated_note_ids=["z" * 10_000]), REQUEST, max_episode_bytes=MIB
        )
    assert len(str(caught.value)) < 200


def test_validate_rejects_a_nonsensical_limit() -> None:
    with pytest.raises(ValueError, match="max_episode_bytes"):
        validate_result(ok_result(), REQUEST, max_episode_bytes=0)


# --------------------------------------------------------------------------------------------
# Loader


@pytest.fixture
def samples(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """`plugin_samples` importable by name, as an operator's module on sys.path would be."""
    monkeypatch.syspath_prepend(str(HERE))
    module = importlib.import_module("plugin_samples")
    module.sync_calls.clear()
    yield module
    module.sync_calls.clear()


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """Replace installed entry points of the generator group with `name=target` pairs."""
    eps = EntryPoints(
        EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
        for name, value in targets.items()
    )

    def select(**params: Any) -> EntryPoints:
        return eps.select(**params)

    monkeypatch.setattr(plugins_module, "entry_points", select)


def test_builtin_template_loads_by_name_without_installed_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_entry_points(monkeypatch)  # as if mf-worker were not installed
    assert isinstance(load_generator("template"), TemplateGenerator)
    assert isinstance(load_generator("  template "), TemplateGenerator)


def test_a_builtin_name_wins_over_an_entry_point_of_the_same_name(
    monkeypatch: pytest.MonkeyPatch, samples: ModuleType
) -> None:
    fake_entry_points(monkeypatch, template="plugin_samples:factory")
    assert isinstance(load_generator("template"), TemplateGenerator)


def test_entry_point_names_are_loaded_and_listed(
    monkeypatch: pytest.MonkeyPatch, samples: ModuleType
) -> None:
    fake_entry_points(monkeypatch, sample="plugin_samples:factory")
    assert available_generators() == {
        "sample": "plugin_samples:factory",
        "template": "mf_worker.generators.template:TemplateGenerator",
    }
    generator = load_generator("sample")
    assert generate(generator, REQUEST).title == "from factory"


def test_a_broken_entry_point_is_reported_with_its_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_entry_points(monkeypatch, broken="mf_worker_no_such_module_42:gen")
    with pytest.raises(PluginLoadError, match=r"generator 'broken': entry point .* failed"):
        load_generator("broken")


def test_unknown_name_lists_the_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, other="some.module:gen")
    with pytest.raises(PluginLoadError) as caught:
        load_generator("gpt-9")
    message = str(caught.value)
    assert "'gpt-9'" in message
    assert "unknown name" in message
    assert "available: other, template" in message


def test_module_attr_path_loads_a_builtin_class() -> None:
    generator = load_generator("mf_worker.generators.template:TemplateGenerator")
    assert isinstance(generator, TemplateGenerator)


def test_module_attr_object_is_returned_as_is(samples: ModuleType) -> None:
    assert load_generator("plugin_samples:instance") is samples.instance


def test_module_attr_class_is_instantiated(samples: ModuleType) -> None:
    generator = load_generator("plugin_samples:SampleGenerator")
    assert isinstance(generator, samples.SampleGenerator)
    assert generate(generator, REQUEST).title == "from class"


def test_module_attr_zero_arg_factory_is_called(samples: ModuleType) -> None:
    generator = load_generator("plugin_samples:factory")
    assert generate(generator, REQUEST).title == "from factory"


def test_dotted_attribute_paths_are_followed(samples: ModuleType) -> None:
    generator = load_generator("plugin_samples:instance.generate")
    assert isinstance(generator, FunctionGenerator)  # a bound async method taking the request
    assert generate(generator, REQUEST).title == "from instance"


def test_async_function_is_wrapped_and_awaited(samples: ModuleType) -> None:
    generator = load_generator("plugin_samples:async_generate")
    assert isinstance(generator, FunctionGenerator)
    assert isinstance(generator, Generator)
    assert generate(generator, REQUEST).title == "from async 4"


def test_sync_function_runs_in_a_thread_not_on_the_event_loop(samples: ModuleType) -> None:
    generator = load_generator("plugin_samples:sync_generate")

    async def run() -> tuple[int, GenerationResult]:
        return threading.get_ident(), await generator.generate(REQUEST)

    loop_thread, result = asyncio.run(run())
    assert result.title == "from sync 4"
    assert len(samples.sync_calls) == 1
    assert samples.sync_calls[0] != loop_thread


def test_missing_module_is_named(samples: ModuleType) -> None:
    with pytest.raises(
        PluginLoadError, match="module 'mf_worker_no_such_module_42' not found"
    ) as caught:
        load_generator("mf_worker_no_such_module_42:gen")
    assert "'mf_worker_no_such_module_42:gen'" in str(caught.value)


def test_a_module_whose_own_import_fails_is_not_called_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "plugin_with_missing_dep.py").write_text("import mf_worker_no_such_dep_42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError) as caught:
        load_generator("plugin_with_missing_dep:gen")
    message = str(caught.value)
    assert "importing module 'plugin_with_missing_dep' failed" in message
    assert "mf_worker_no_such_dep_42" in message


def test_missing_attribute_is_named(samples: ModuleType) -> None:
    with pytest.raises(PluginLoadError, match="module 'plugin_samples' has no attribute 'nope'"):
        load_generator("plugin_samples:nope")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("plugin_samples:NOT_A_GENERATOR", "the object is an int, not a generator"),
        ("plugin_samples:SyncGenerateMethod", "whose 'generate' method is not 'async def'"),
        ("plugin_samples:sync_method_instance", "whose 'generate' method is not 'async def'"),
        ("plugin_samples:failing_factory", "factory raised RuntimeError: no API key configured"),
        ("plugin_samples:factory_of_junk", "factory returned an int"),
        ("plugin_samples:two_parameters", "takes 2 required parameters"),
        ("plugin_samples:async_no_parameters", "async function without a required parameter"),
        ("plugin_samples:", "malformed path"),
        (":factory", "malformed path"),
        ("   ", "generator spec is empty"),
    ],
)
def test_unusable_objects_are_rejected_with_the_reason(
    samples: ModuleType, spec: str, message: str
) -> None:
    with pytest.raises(PluginLoadError, match=re.escape(message)):
        load_generator(spec)


def test_available_generators_includes_the_builtin() -> None:
    assert available_generators()["template"] == "mf_worker.generators.template:TemplateGenerator"


# --------------------------------------------------------------------------------------------
# estimate_max_usage


def test_estimate_max_usage_calls_the_optional_method(samples: ModuleType) -> None:
    estimate = estimate_max_usage(samples.Estimating(), REQUEST)
    assert estimate == TokenUsage(model="sample", prompt_tokens=100, completion_tokens=50)


def test_estimate_max_usage_is_none_without_the_method(samples: ModuleType) -> None:
    assert estimate_max_usage(samples.SampleGenerator(), REQUEST) is None
    assert estimate_max_usage(load_generator("plugin_samples:async_generate"), REQUEST) is None


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"prompt_tokens": 1}, "estimate_max_usage: expected a TokenUsage, got dict"),
        (TokenUsage("m", -1, 0), "estimate_max_usage.prompt_tokens: -1 is negative"),
        (TokenUsage("", 1, 0), "estimate_max_usage.model: empty"),
    ],
)
def test_estimate_max_usage_rejects_a_bad_estimate(returned: object, message: str) -> None:
    class Bad:
        async def generate(self, request: GenerationRequest) -> GenerationResult:
            raise AssertionError("never called")

        def estimate_max_usage(self, request: GenerationRequest) -> object:
            return returned

    with pytest.raises(InvalidOutputError, match=message):
        estimate_max_usage(Bad(), REQUEST)


def test_estimate_max_usage_must_be_synchronous() -> None:
    class AsyncEstimate:
        async def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
            return TokenUsage("m", 1, 1)

    with pytest.raises(InvalidOutputError, match="must be synchronous"):
        estimate_max_usage(AsyncEstimate(), REQUEST)
