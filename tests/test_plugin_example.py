"""The example plugin package in `examples/mf-worker-example-generator` works as documented.

It is loaded the way the worker loads any plugin — by `module:attribute` with the example's
`src` on `sys.path`, and through the entry point its pyproject declares — so the package stays
a correct template for plugin authors: its output passes `validate_result`, its errors have the
kinds the worker understands, its cost estimate is a real bound, the worker stores what it
writes, and `mf-worker generate` prints it.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tomllib
from datetime import UTC, date, datetime
from importlib.metadata import EntryPoint
from typing import Any

import psycopg
import pytest

from mf_worker.engine.worker import Outcome
from mf_worker.generation import (
    ENTRY_POINT_GROUP,
    GenerationRequest,
    Generator,
    PermanentGenerationError,
    PlanningNote,
    PluginLoadError,
    PreviousEpisode,
    ProjectInfo,
    RetryableGenerationError,
    estimate_max_usage,
    load_generator,
    validate_result,
)
from mf_worker.settings import load_settings

from .factories import make_note, make_queue_item, make_tenant
from .workers import ROOT, run_single, worker_env

Conn = psycopg.Connection[dict[str, Any]]

EXAMPLE = ROOT / "examples" / "mf-worker-example-generator"
SPEC = "mf_worker_example.generator:DigestGenerator"


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's `src` importable, as after `pip install`, without installing it."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.delenv("EXAMPLE_DIGEST_STYLE", raising=False)
    for name in [m for m in sys.modules if m.startswith("mf_worker_example")]:
        monkeypatch.delitem(sys.modules, name)


def make_request(**changes: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "queue_item_id": "queue_1",
        "attempt": 1,
        "organization_id": "org_1",
        "project": ProjectInfo("prj_1", "Lithium 2030", "Lithium supply chains and permits.",
                               {"mode": "daily"}, "Europe/London"),
        "episode_number": 3,
        "scheduled_for": datetime(2026, 3, 2, 9, tzinfo=UTC),
        "local_date": date(2026, 3, 2),
        "planning_notes": (PlanningNote("n1", "More on permits"),
                           PlanningNote("n2", "Recycling, please")),
        "memories": (),
        "previous_episodes": (PreviousEpisode(2, "Prices slide", "Spot prices fell."),),
        "idempotency_key": "queue_1",
    }
    values.update(changes)
    return GenerationRequest(**values)


def test_pyproject_declares_the_generator_entry_point_and_depends_on_mf_worker() -> None:
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["entry-points"][ENTRY_POINT_GROUP] == {"example": SPEC}
    assert "mf-worker" in project["dependencies"]
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    module, _, attr = SPEC.partition(":")
    source = EXAMPLE / "src" / (module.replace(".", "/") + ".py")
    assert f"class {attr}" in source.read_text()


def test_the_declared_entry_point_loads_a_generator(example_on_path: None) -> None:
    """What the worker does for MF_GENERATOR=example once the package is installed."""
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    ((name, value),) = pyproject["project"]["entry-points"][ENTRY_POINT_GROUP].items()
    target = EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP).load()
    generator = load_generator(SPEC)
    assert isinstance(generator, target) and isinstance(generator, Generator)


def test_its_output_passes_validation_and_uses_the_notes(example_on_path: None) -> None:
    generator = load_generator(SPEC)
    request = make_request()
    result = validate_result(asyncio.run(generator.generate(request)), request,
                             max_episode_bytes=1 << 20)
    assert result.title.startswith("Lithium 2030 — ")
    assert [b.content.splitlines()[0] for b in result.blocks] == [
        "### Where we are", "### Since last time", "### Your notes"]
    assert result.incorporated_note_ids == ("n1", "n2")
    assert result.new_memories[0].content == "Asked about: More on permits"
    (usage,) = result.usages
    assert usage.model == "example-digest" and usage.completion_tokens > 0


def test_its_cost_estimate_bounds_what_it_reports_even_for_huge_inputs(
    example_on_path: None,
) -> None:
    generator = load_generator(SPEC)
    huge = "word " * 20_000
    for request in (make_request(), make_request(
            project=ProjectInfo("p", huge, huge, {}, "UTC"),
            planning_notes=tuple(PlanningNote(f"n{i}", huge) for i in range(8)),
            previous_episodes=(PreviousEpisode(9, huge, huge),))):
        worst = estimate_max_usage(generator, request)
        (usage,) = asyncio.run(generator.generate(request)).usages
        assert worst is not None and worst.model == usage.model
        assert usage.prompt_tokens <= worst.prompt_tokens
        assert usage.completion_tokens <= worst.completion_tokens


def test_its_failures_are_of_the_kinds_the_worker_understands(example_on_path: None) -> None:
    generator = load_generator(SPEC)
    with pytest.raises(PermanentGenerationError, match="no brief"):
        asyncio.run(generator.generate(make_request(
            project=ProjectInfo("p", "t", "  ", {}, "UTC"))))
    with pytest.raises(RetryableGenerationError) as busy:
        asyncio.run(generator.generate(make_request(
            project=ProjectInfo("p", "busy: now", "brief", {}, "UTC"))))
    assert busy.value.retry_after == 30


def test_a_bad_setting_stops_loading_with_the_variable_named(
    example_on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    haiku, _ = load_settings(environ={"EXAMPLE_DIGEST_STYLE": "haiku"})
    with pytest.raises(PluginLoadError, match=r"EXAMPLE_DIGEST_STYLE='haiku': must be one of"):
        load_generator(SPEC, haiku)
    bullets, _ = load_settings(environ={"EXAMPLE_DIGEST_STYLE": "bullets"})
    result = asyncio.run(load_generator(SPEC, bullets).generate(make_request()))
    assert "- More on permits\n- Recycling, please" in result.blocks[-1].content


def test_the_worker_stores_the_examples_episode(
    example_on_path: None, db_url: str, db: Conn
) -> None:
    t = make_tenant(db)
    note = make_note(db, t["project"], note="More on permits")
    item = make_queue_item(db, t["project"])
    assert run_single(db_url, item["id"], generator=SPEC) is Outcome.SUCCESS
    episode = db.execute("SELECT e.* FROM episodes e JOIN episode_schedule_queue q "
                         "ON q.episode_id = e.id WHERE q.id = %s", [item["id"]]).fetchone()
    assert episode is not None and episode["status"] == "ready"
    usage = db.execute("SELECT model FROM token_usage WHERE episode_id = %s",
                       [episode["id"]]).fetchone()
    assert usage == {"model": "example-digest"}
    row = db.execute("SELECT status FROM planning_notes WHERE id = %s", [note["id"]]).fetchone()
    assert row == {"status": "incorporated"}


def test_mf_worker_generate_previews_the_example_without_writing(db_url: str, db: Conn) -> None:
    t = make_tenant(db, title="Urban farming")
    make_note(db, t["project"], note="Vertical farms in London")
    env = worker_env(db_url, PYTHONPATH=f"{ROOT}:{EXAMPLE / 'src'}")
    shown = subprocess.run(
        [sys.executable, "-m", "mf_worker", "generate", t["project"]["id"], "--generator", SPEC,
         "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr
    preview = json.loads(shown.stdout)
    assert preview["generator"] == SPEC and preview["title"].startswith("Urban farming — ")
    assert preview["incorporated_notes"][0]["note"] == "Vertical farms in London"
    assert preview["episode_number"] == 1 and preview["written"] is False
    assert preview["worst_case_usage"]["completion_tokens"] == 1000
    for table in ("episodes", "token_usage", "episode_schedule_queue"):
        count = db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()
        assert count == {"n": 0}, table


def test_the_plugin_guide_walks_through_this_example() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    assert "examples/mf-worker-example-generator" in guide
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    declared = re.search(r'^example = ".*"$', pyproject, re.MULTILINE)
    assert declared is not None and declared.group() in guide
