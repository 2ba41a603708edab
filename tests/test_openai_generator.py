"""The `openai` generator against a real HTTP server on loopback that answers like an
OpenAI-compatible API would — successes, each error class, slow answers, broken JSON, replies
without `usage` — alone, through the engine (item state, `last_error`) and through the
`mf-worker generate` command. The server is a stdlib `http.server` in a thread: a fake that
really speaks HTTP, not a mock of the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from mf_worker.cli.preview import build_preview_request
from mf_worker.db import connect
from mf_worker.engine.worker import Outcome
from mf_worker.errors import ConfigError, PluginLoadError
from mf_worker.generation import (
    GenerationRequest,
    GenerationResult,
    Memory,
    PermanentGenerationError,
    PlanningNote,
    PreviousEpisode,
    ProjectInfo,
    RetryableGenerationError,
    TokenUsage,
    load_generator,
    validate_result,
)
from mf_worker.generators.openai import LLMConfig, OpenAICompatibleGenerator
from mf_worker.generators.openai.client import redact_key, retry_after_seconds
from mf_worker.generators.openai.prompt import build_messages
from mf_worker.generators.openai.reply import parse_reply, salvage_reply
from mf_worker.generators.template import TemplateGenerator
from mf_worker.settings import load_settings

from .conftest import settings_for
from .factories import item_state, make_episode, make_note, make_queue_item, make_tenant, one
from .workers import ROOT, llm_settings, run_single, worker_env

Conn = psycopg.Connection[dict[str, Any]]

KEY = "sk-test-Zx9Qw7Lp3Vb5Nm1Kj8Hg6Fd4Sa2Ty0"
MODEL = "gpt-4o-mini"  # in the shipped price table, so costs are small but not zero
OPENAI = "openai"  # the entry-point name operators use (MF_GENERATOR=openai)


# --------------------------------------------------------------------------------------------
# The fake server


@dataclass
class Reply:
    """One scripted answer: status, JSON (or raw bytes) body, headers, delay before answering."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeLLM:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 answering from a script.

    Replies are used in order; the last one repeats when the script runs out. Every request is
    recorded (path, headers with lower-case names, JSON body).
    """

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.last: Reply | None = None
        self.seen: list[Seen] = []
        # What went wrong inside the server (a test's broken script, a bad request): the
        # handler's thread cannot fail the test, so the ``llm`` fixture fails it afterwards.
        self.errors: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                with fake.lock:
                    fake.seen.append(Seen(self.path, {k.lower(): v for k, v in
                                                      self.headers.items()}, json.loads(raw)))
                    reply = fake.script.popleft() if fake.script else fake.last
                    fake.last = reply
                assert reply is not None, "the fake LLM has no scripted reply"
                time.sleep(reply.delay)
                payload = (reply.body if isinstance(reply.body, bytes)
                           else json.dumps(reply.body).encode())
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                fake.errors.append(traceback.format_exc())

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reply(self, *replies: Reply) -> FakeLLM:
        self.script.extend(replies)
        return self

    def start(self) -> FakeLLM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat(content: str, *, usage: tuple[int, int] | None = (321, 123),
         finish_reason: str = "stop") -> Reply:
    """A 200 chat completion whose message is ``content``."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "served-model",
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": sum(usage)}
    return Reply(body=body)


def error(status: int, message: str, **headers: str) -> Reply:
    """An error the OpenAI way: ``{"error": {"message": …}}``."""
    return Reply(status=status, headers=headers,
                 body={"error": {"message": message, "type": "invalid_request_error"}})


def episode_json(note_ids: Sequence[object] | None = None, **changes: Any) -> str:
    episode: dict[str, Any] = {
        "title": "Refinery permits speed up",
        "sections": [
            {"markdown": "### Permits\n\nThree refineries got permits this month.",
             "reasoning": "Follows the reader's note on permits.", "confidence": 0.8},
            {"markdown": "### Recycling\n\nTwo recycling start-ups raised money.",
             "reasoning": "Asked for by the reader.", "confidence": 0.6},
        ],
        "used_note_ids": note_ids if note_ids is not None else ["note_a"],
        "new_memories": [{"content": "Cares about permits", "memory_type": "preference",
                          "importance": 0.7}],
    }
    episode.update(changes)
    return json.dumps(episode)


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()
    assert server.errors == [], "the fake LLM server failed:\n" + "\n".join(server.errors)


@pytest.fixture
def llm_env(llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> FakeLLM:
    """The MF_LLM_* variables pointing at the fake server, with an API key and a short timeout."""
    for name in ("MF_LLM_API_KEY_FILE", "CREDENTIALS_DIRECTORY", "MF_LLM_MAX_TOKENS",
                 "MF_LLM_TEMPERATURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MF_LLM_BASE_URL", llm.base_url)
    monkeypatch.setenv("MF_LLM_MODEL", MODEL)
    monkeypatch.setenv("MF_LLM_API_KEY", KEY)
    monkeypatch.setenv("MF_LLM_TIMEOUT", "5")
    return llm


def config_from(environ: dict[str, str]) -> LLMConfig:
    """The generator's configuration from these variables, through the one settings parser."""
    settings, _ = load_settings(environ=environ)
    return LLMConfig.from_settings(settings)


def make_request(**changes: Any) -> GenerationRequest:
    request = GenerationRequest(
        queue_item_id="queue_1",
        attempt=1,
        organization_id="org_1",
        project=ProjectInfo(
            id="prj_1", title="Lithium 2030",
            description="Lithium supply chains, battery recycling and refinery permits.",
            cadence_config={"mode": "weekly", "days": [1]}, timezone="Europe/Berlin",
        ),
        episode_number=4,
        scheduled_for=datetime(2026, 3, 2, 8, 0, tzinfo=UTC),
        local_date=date(2026, 3, 2),
        planning_notes=(PlanningNote("note_a", "More on refinery permits"),
                        PlanningNote("note_b", "Battery recycling start-ups")),
        memories=(Memory("Prefers short bullet points", importance=0.9),),
        previous_episodes=(PreviousEpisode(3, "Prices slide", "Spot prices fell 10 %."),),
        idempotency_key="queue_1",
    )
    return dataclasses.replace(request, **changes)


def generate(request: GenerationRequest | None = None) -> GenerationResult:
    """One generation with a fresh generator configured from the environment."""
    async def main() -> GenerationResult:
        generator = OpenAICompatibleGenerator(settings=llm_settings())
        try:
            return await generator.generate(request or make_request())
        finally:
            await generator.aclose()

    return asyncio.run(main())


def failure(request: GenerationRequest | None = None) -> Exception:
    with pytest.raises((RetryableGenerationError, PermanentGenerationError)) as info:
        generate(request)
    return info.value


# --------------------------------------------------------------------------------------------
# Configuration


def test_config_requires_base_url_and_model_and_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MF_LLM_BASE_URL is not set"):
        config_from({"MF_LLM_MODEL": "m"})
    with pytest.raises(ConfigError, match="MF_LLM_MODEL is not set"):
        config_from({"MF_LLM_BASE_URL": "http://127.0.0.1:1/v1"})
    with pytest.raises(ConfigError, match="MF_LLM_BASE_URL='ftp://x': must be an http"):
        config_from({"MF_LLM_BASE_URL": "ftp://x", "MF_LLM_MODEL": "m"})
    base = {"MF_LLM_BASE_URL": "http://127.0.0.1:1/v1/", "MF_LLM_MODEL": "m"}
    for name, raw, problem in [("MF_LLM_MAX_TOKENS", "lots", "whole number"),
                               ("MF_LLM_MAX_TOKENS", "0", "at least 1"),
                               ("MF_LLM_TEMPERATURE", "3", "at most 2"),
                               ("MF_LLM_TIMEOUT", "0", "greater than 0"),
                               ("MF_LLM_TIMEOUT", "nan", "finite"),
                               ("MF_LLM_TIMEOUT", "7200", "at most 3600"),
                               ("MF_LLM_JSON_MODE", "maybe", "one of on/off")]:
        with pytest.raises(ConfigError, match=f"{name}='{raw}': must be .*{problem}"):
            config_from({**base, name: raw})
    config = config_from(base)
    assert (config.base_url, config.max_tokens, config.temperature, config.timeout,
            config.json_mode) == ("http://127.0.0.1:1/v1", 1500, 0.7, 120.0, True)
    assert config.api_key is None


def test_api_key_comes_from_the_variable_a_key_file_or_a_systemd_credential_and_never_shows(
    tmp_path: Path,
) -> None:
    base = {"MF_LLM_BASE_URL": "https://llm.example/v1", "MF_LLM_MODEL": "m"}
    direct = config_from({**base, "MF_LLM_API_KEY": KEY})
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    from_file = config_from({**base, "MF_LLM_API_KEY_FILE": str(key_file)})
    (tmp_path / "mf_llm_api_key").write_text(KEY)
    from_credential = config_from({**base, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    for config in (direct, from_file, from_credential):
        assert config.api_key is not None and config.api_key.reveal() == KEY
        assert KEY not in repr(config) and KEY not in str(config)
    with pytest.raises(ConfigError, match="both set") as both:
        config_from({**base, "MF_LLM_API_KEY": KEY,
                            "MF_LLM_API_KEY_FILE": str(key_file)})
    assert KEY not in str(both.value)
    with pytest.raises(ConfigError, match=r"MF_LLM_API_KEY_FILE=.*cannot read"):
        config_from({**base, "MF_LLM_API_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="the key file is empty"):
        config_from({**base, "MF_LLM_API_KEY_FILE": str(tmp_path / "empty")})


@pytest.mark.parametrize(
    ("name", "raw", "accepted"),
    [("MF_LLM_TEMPERATURE", "3", False),  # main: `config` showed 3, the generator refused it
     ("MF_LLM_TIMEOUT", "7200", False),  # main: likewise (the generator's cap is 3600 s)
     ("MF_LLM_TEMPERATURE", "2", True),
     ("MF_LLM_TIMEOUT", "3600", True),
     ("MF_LLM_MAX_TOKENS", "1_000", True)],
)
def test_mf_worker_config_and_the_generator_accept_exactly_the_same_values(
    name: str, raw: str, accepted: bool
) -> None:
    """One parser: `mf-worker config` (a real process) shows a value only if the `openai`
    generator then runs with it, and refuses the same values, naming the variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.update({"MF_LLM_BASE_URL": "http://127.0.0.1:1/v1", "MF_LLM_MODEL": MODEL, name: raw})
    shown = subprocess.run([sys.executable, "-m", "mf_worker", "config", "--json"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    generator_error: str | None = None
    used: LLMConfig | None = None
    try:
        settings, _ = load_settings(environ={k: v for k, v in env.items()
                                             if k.startswith("MF_")})
        generator = load_generator(OPENAI, settings)
    except (ConfigError, PluginLoadError) as exc:
        generator_error = str(exc)
    else:
        assert isinstance(generator, OpenAICompatibleGenerator)
        used = generator.config
    assert (shown.returncode == 0) is accepted, shown.stderr
    assert (generator_error is None) is accepted, generator_error
    if accepted:
        rows = {row["variable"]: row["value"] for row in json.loads(shown.stdout)}
        field_name = name.removeprefix("MF_LLM_").lower()
        assert getattr(used, field_name) == rows[name]  # what config showed
    else:
        assert shown.stderr.startswith(f"mf-worker: error: {name}='{raw}': must be")
        assert f"{name}='{raw}': must be" in (generator_error or "")


def test_without_httpx_the_generator_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, llm_env: FakeLLM
) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # what `import httpx` sees when missing
    with pytest.raises(PluginLoadError, match=r"pip install 'mf-worker\[openai\]'"):
        OpenAICompatibleGenerator(settings=llm_settings())


def test_openai_is_published_as_an_entry_point_with_an_optional_httpx_extra() -> None:
    """pyproject declares `openai` in the generators group and httpx only as an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    group = project["entry-points"]["mf_worker.generators"]
    assert group.get("openai") == "mf_worker.generators.openai:OpenAICompatibleGenerator"
    assert any(dep.startswith("httpx") for dep in project["optional-dependencies"]["openai"])
    assert not any(dep.startswith("httpx") for dep in project["dependencies"])
    listed = subprocess.run([sys.executable, "-m", "mf_worker", "generators"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    assert "openai" in listed.stdout and "OpenAICompatibleGenerator" in listed.stdout


# --------------------------------------------------------------------------------------------
# What is sent, what comes back


def test_success_sends_the_prompt_key_and_idempotency_key_and_reports_the_servers_usage(
    llm_env: FakeLLM,
) -> None:
    llm_env.reply(chat(episode_json(), usage=(321, 123)))
    request = make_request()
    result = validate_result(generate(request), request, max_episode_bytes=1 << 20)

    assert result.title == "Refinery permits speed up"
    assert [b.confidence for b in result.blocks] == [0.8, 0.6]
    assert result.blocks[0].reasoning == "Follows the reader's note on permits."
    assert result.incorporated_note_ids == ("note_a",)
    assert [(m.content, m.importance) for m in result.new_memories] == [
        ("Cares about permits", 0.7)]
    assert result.usages == (TokenUsage(MODEL, 321, 123),)

    (seen,) = llm_env.seen
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["idempotency-key"] == "queue_1"
    body = seen.body
    assert (body["model"], body["max_tokens"], body["temperature"]) == (MODEL, 1500, 0.7)
    assert body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system["role"] == "system" and '"used_note_ids"' in system["content"]
    text = user["content"]
    for expected in ("Lithium 2030", "refinery permits", "weekly, on Monday", "Episode number: 4",
                     "Monday 2 March 2026 (Europe/Berlin)", "Episode 3: Prices slide",
                     "Prefers short bullet points", "id note_a: More on refinery permits",
                     "id note_b: Battery recycling start-ups"):
        assert expected in text, expected


@pytest.mark.parametrize(
    ("reply", "title", "contents"),
    [
        ("Here you go!\n```json\n" + episode_json() + "\n```\nEnjoy.", None, None),
        ("Sure. " + episode_json() + " Let me know if you need more.", None, None),
        ('{"title": "T", "sections": [{"markdown": "A", "confidence": 0.5,},],}', "T", ["A"]),
        ('{"title": "T", "sections": ["First part", "Second part"]}', "T",
         ["First part", "Second part"]),
        ("{'title': 'T', 'sections': ['Only part'], 'used_note_ids': [], 'x': True}", "T",
         ["Only part"]),
        ('{"episode": {"title": "T", "sections": ["Nested"]}}', "T", ["Nested"]),
        ('{"title": "## T", "sections": [{"markdown": "multi\nline"}]}', "T", ["multi\nline"]),
    ],
    ids=["code-fence", "prose-around", "trailing-commas", "sections-as-strings",
         "python-literal", "wrapped", "raw-newline-in-string"],
)
def test_tolerant_parsing_accepts_common_deviations_without_a_repair_turn(
    llm_env: FakeLLM, reply: str, title: str | None, contents: list[str] | None
) -> None:
    llm_env.reply(chat(reply))
    result = generate()
    assert len(llm_env.seen) == 1
    if title is not None:
        assert result.title == title
    if contents is not None:
        assert [b.content for b in result.blocks] == contents
    validate_result(result, make_request(), max_episode_bytes=1 << 20)


def test_json_mode_off_sends_no_response_format_and_still_parses_tolerantly(
    llm_env: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For servers that reject `response_format`: MF_LLM_JSON_MODE=off leaves it out."""
    monkeypatch.setenv("MF_LLM_JSON_MODE", "off")
    llm_env.reply(chat("Sure:\n```json\n" + episode_json() + "\n```"))
    assert generate().title == "Refinery permits speed up"
    assert "response_format" not in llm_env.seen[0].body


def test_unknown_note_ids_are_dropped_and_logged_and_bad_confidences_become_none(
    llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    sections = [{"markdown": "a", "confidence": 1.7}, {"markdown": "b", "confidence": "high"},
                {"markdown": "c", "confidence": True}, {"markdown": "d", "confidence": 0},
                {"markdown": "   "}]
    memories = [{"content": "likes maps", "importance": 7}, {"content": ""}, "plain memory"]
    llm_env.reply(chat(episode_json(["note_b", "note_zzz", "note_b", 5], sections=sections,
                                    new_memories=memories)))
    request = make_request()
    result = validate_result(generate(request), request, max_episode_bytes=1 << 20)
    assert result.incorporated_note_ids == ("note_b",)
    assert [(b.content, b.confidence) for b in result.blocks] == [
        ("a", None), ("b", None), ("c", None), ("d", 0.0)]
    assert [(m.content, m.importance) for m in result.new_memories] == [
        ("likes maps", 0.5), ("plain memory", 0.5)]
    dropped = [json.loads(line) for line in captured_logs.getvalue().splitlines()
               if "unknown_note_ids_dropped" in line]
    assert len(dropped) == 1 and dropped[0]["note_ids"] == ["note_zzz"]


def test_reply_without_usage_is_estimated_and_the_estimate_is_logged(
    llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    content = episode_json()
    llm_env.reply(chat(content, usage=None))
    result = generate()
    (usage,) = result.usages
    sent = sum(len(m["content"]) for m in llm_env.seen[0].body["messages"])
    assert usage == TokenUsage(MODEL, -(-sent // 4), -(-len(content) // 4))
    events = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    estimated = [e for e in events if e["event"] == "usage_estimated"]
    assert len(estimated) == 1 and estimated[0]["level"] == "warning"
    assert estimated[0]["prompt_tokens"] == usage.prompt_tokens
    assert not [e for e in events if e["event"] == "llm_usage"]


def test_reported_usage_is_logged_as_coming_from_the_server(
    llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    llm_env.reply(chat(episode_json(), usage=(1000, 200)))
    generate()
    events = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    (line,) = [e for e in events if e["event"] == "llm_usage"]
    assert (line["source"], line["prompt_tokens"], line["completion_tokens"]) == (
        "server", 1000, 200)
    assert "usage_estimated" not in captured_logs.getvalue()


# --------------------------------------------------------------------------------------------
# The repair turn


def test_malformed_reply_twice_is_permanent_after_exactly_one_repair_turn(
    llm_env: FakeLLM,
) -> None:
    llm_env.reply(chat("I think the episode should be about lithium.", usage=(300, 10)),
                  chat('{"title": "T", "sections": [', usage=(400, 12), finish_reason="length"))
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert str(err) == (
        "the model's reply is not the requested JSON, even after one repair attempt: the reply "
        "was cut off before the JSON object was complete (it reached max_tokens); write less")
    assert len(llm_env.seen) == 2
    first, second = llm_env.seen
    assert second.body["messages"][:2] == first.body["messages"]
    bad, instructions = second.body["messages"][2:]
    assert bad == {"role": "assistant",
                   "content": "I think the episode should be about lithium."}
    assert instructions["role"] == "user"
    assert "the reply contains no JSON object" in instructions["content"]
    # The repair call has a key of its own: a deduplicating provider must not replay reply 1.
    assert second.headers["idempotency-key"] == "queue_1:repair"


def test_malformed_then_good_after_repair_succeeds_and_sums_both_calls_usage(
    llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    llm_env.reply(chat('{"headline": "no sections here"}', usage=(300, 10)),
                  chat(episode_json(), usage=(450, 120)))
    result = generate()
    assert len(llm_env.seen) == 2
    assert result.title == "Refinery permits speed up"
    assert result.usages == (TokenUsage(MODEL, 750, 130),)
    assert 'no \\"sections\\" with markdown text' in captured_logs.getvalue()


def test_the_repair_turn_tells_the_model_where_its_json_broke(llm_env: FakeLLM) -> None:
    llm_env.reply(chat('{"title": "T", "sections": [{"markdown": "a"} {"markdown": "b"}]}'),
                  chat(episode_json()))
    assert generate().title == "Refinery permits speed up"
    instructions = llm_env.seen[1].body["messages"][3]["content"]
    assert ("Your reply could not be used: the reply's JSON object is not valid JSON "
            "(Expecting ',' delimiter at line 1 column 47).") in instructions


def test_a_reply_cut_off_twice_keeps_the_complete_sections_before_the_cut(
    llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    """Last resort after the repair turn: the complete part of a reply that hit max_tokens."""
    whole = episode_json()
    cut = whole[: whole.index("Two recycling")]  # inside the second section's markdown
    llm_env.reply(chat(cut, usage=(300, 400), finish_reason="length"),
                  chat(cut, usage=(700, 400), finish_reason="length"))
    request = make_request()
    result = validate_result(generate(request), request, max_episode_bytes=1 << 20)
    assert len(llm_env.seen) == 2
    assert result.title == "Refinery permits speed up"
    assert [b.content for b in result.blocks] == [
        "### Permits\n\nThree refineries got permits this month."]
    assert result.incorporated_note_ids == ()  # the ids came after the cut
    assert result.usages == (TokenUsage(MODEL, 1000, 800),)
    salvaged = [json.loads(line) for line in captured_logs.getvalue().splitlines()
                if "llm_reply_salvaged" in line]
    assert [(e["call"], e["blocks"]) for e in salvaged] == [("repair", 1)]


def test_salvage_keeps_the_complete_prefix_of_a_cut_off_or_broken_object() -> None:
    assert salvage_reply('{"title": "T", "sections": ["a", "b') == {
        "title": "T", "sections": ["a"]}
    assert salvage_reply('{"title": "T", "sections": [{"markdown": "a"}, {"x": {"y": [1, ') == {
        "title": "T", "sections": [{"markdown": "a"}, {"x": {"y": [1]}}]}
    assert salvage_reply('{"title": "T", "sections": ["a"], {"oops": 1}], "more": 2}') == {
        "title": "T", "sections": ["a"]}
    assert salvage_reply('{"title": "T') is None
    assert salvage_reply("no object at all") is None


def test_an_empty_or_missing_message_content_is_repaired_like_broken_json(
    llm_env: FakeLLM,
) -> None:
    empty = chat("")
    empty.body["choices"][0]["message"]["content"] = None
    llm_env.reply(empty, chat(episode_json()))
    assert generate().title == "Refinery permits speed up"
    assert "the reply was empty" in llm_env.seen[1].body["messages"][3]["content"]


# --------------------------------------------------------------------------------------------
# HTTP errors


def test_429_with_retry_after_seconds_is_retryable_with_that_delay(llm_env: FakeLLM) -> None:
    llm_env.reply(error(429, "Rate limit reached for requests", **{"Retry-After": "17"}))
    err = failure()
    assert isinstance(err, RetryableGenerationError) and err.retry_after == 17.0
    assert str(err) == "LLM server rate limit (HTTP 429: Rate limit reached for requests)"
    assert len(llm_env.seen) == 1  # no retries inside the attempt


def test_429_with_an_http_date_retry_after_gives_the_seconds_until_then(
    llm_env: FakeLLM,
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=90)
    llm_env.reply(error(429, "slow down", **{"Retry-After": format_datetime(when, usegmt=True)}))
    started = time.monotonic()
    err = failure()
    assert isinstance(err, RetryableGenerationError) and err.retry_after is not None
    # Seconds until `when`, read after it was written: at most 90, and the date has whole
    # seconds. The lower bound is loose on purpose (a busy machine may be slow to get here).
    assert 60 <= err.retry_after <= 91
    # Sleeping for it would take the whole 90 s: not a speed bound, a "did not wait" one.
    assert time.monotonic() - started < 60


def test_retry_after_parsing_of_seconds_dates_milliseconds_and_junk() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert retry_after_seconds({"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}, now=now) == 30
    assert retry_after_seconds({"retry-after": "Wed, 31 Dec 2025 00:00:00 GMT"}, now=now) == 0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after": "-3"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retryable_with_the_servers_message(llm_env: FakeLLM, status: int) -> None:
    llm_env.reply(error(status, "The server had an error while processing your request"))
    err = failure()
    assert isinstance(err, RetryableGenerationError) and err.retry_after is None
    assert str(err) == (f"LLM server error (HTTP {status}: The server had an error while "
                        "processing your request)")


@pytest.mark.parametrize(
    ("status", "message"),
    [(408, "Request timed out"), (409, "Another request with this Idempotency-Key is running"),
     (425, "Too early")],
)
def test_408_409_and_425_are_retryable_like_a_server_error(
    llm_env: FakeLLM, status: int, message: str
) -> None:
    """Timeout, conflict (an idempotent request still in progress) and too-early say "try
    again", unlike the other 4xx."""
    llm_env.reply(error(status, message, **{"Retry-After": "3"}))
    err = failure()
    assert isinstance(err, RetryableGenerationError) and err.retry_after == 3.0
    assert str(err) == f"LLM server error (HTTP {status}: {message})"
    assert len(llm_env.seen) == 1


def test_a_200_whose_body_is_not_json_is_retryable(llm_env: FakeLLM) -> None:
    """A proxy's HTML page with status 200 is a broken hop, not a model's answer."""
    llm_env.reply(Reply(status=200, body=b"<html><body>502 Bad Gateway</body></html>"))
    err = failure()
    assert isinstance(err, RetryableGenerationError)
    assert str(err).startswith("LLM server sent a body that is not JSON (HTTP 200, ")
    assert len(llm_env.seen) == 1


@pytest.mark.parametrize("body", [{"id": "x", "object": "chat.completion", "choices": []},
                                  {"id": "x", "object": "chat.completion"},
                                  {"choices": ["not an object"]}])
def test_a_reply_without_any_choice_is_permanent(llm_env: FakeLLM, body: Any) -> None:
    llm_env.reply(Reply(body=body))
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert str(err).startswith("LLM server answered without any choice")
    assert len(llm_env.seen) == 1  # no repair turn: there is nothing to repair


def test_a_refusal_is_permanent_and_quotes_the_model(llm_env: FakeLLM) -> None:
    refused = chat("")
    refused.body["choices"][0]["message"]["content"] = None
    refused.body["choices"][0]["message"]["refusal"] = "I can't help with\nthat request."
    llm_env.reply(refused)
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert str(err) == "the model refused: I can't help with that request."
    assert len(llm_env.seen) == 1
    # A refused reply was billed: the error carries the server's usage, for the worker to book.
    assert [(u.prompt_tokens, u.completion_tokens) for u in err.usages] == [(321, 123)]


def test_a_repair_turn_that_still_fails_reports_both_calls_usage(llm_env: FakeLLM) -> None:
    """Two billed calls and still no episode: both usages travel with the error."""
    llm_env.reply(chat("not json", usage=(100, 10)), chat("still not json", usage=(200, 20)))
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert [(u.prompt_tokens, u.completion_tokens) for u in err.usages] == [(100, 10),
                                                                           (200, 20)]


def test_a_reply_larger_than_the_cap_is_not_read_whole(
    llm_env: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body far beyond what max_tokens can produce (a broken server or proxy) fails the
    attempt, naming the cap, instead of filling the worker's memory."""
    monkeypatch.setenv("MF_LLM_MAX_TOKENS", "100")  # cap: 64 × 100 + 64 KiB = 71,936 bytes
    huge = chat("x" * 2_000_000)
    llm_env.reply(huge)
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert "larger than 71,936 bytes" in str(err)


def test_a_reply_withheld_by_a_content_filter_is_permanent(llm_env: FakeLLM) -> None:
    llm_env.reply(chat("", finish_reason="content_filter"))
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert str(err) == "the model's reply was withheld by a content filter"
    assert len(llm_env.seen) == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "This model's maximum context length is 4097 tokens"),
     (401, f"Incorrect API key provided: {KEY}. You can find your API key at the dashboard."),
     (403, "Your organization is not allowed to use this model"),
     (404, f"The model `{MODEL}` does not exist"),
     (422, "temperature: must be at most 2")],
)
def test_4xx_is_permanent_with_the_servers_message_but_never_the_key(
    llm_env: FakeLLM, status: int, message: str
) -> None:
    llm_env.reply(error(status, message))
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert str(err).startswith(f"LLM server refused the request (HTTP {status}: ")
    assert KEY not in str(err)
    if status == 401:
        assert str(err) == ("LLM server refused the request (HTTP 401: Incorrect API key "
                            "provided: ***. You can find your API key at the dashboard.)")
    else:
        assert message in str(err)
    assert len(llm_env.seen) == 1


def test_a_plain_text_error_body_is_quoted_on_one_short_line(llm_env: FakeLLM) -> None:
    llm_env.reply(Reply(status=400, body=b"bad request:\n" + b"x" * 1000))
    err = failure()
    assert isinstance(err, PermanentGenerationError)
    assert "\n" not in str(err) and len(str(err)) < 400 and "bad request: xxx" in str(err)


def test_a_server_slower_than_mf_llm_timeout_is_a_retryable_timeout(
    llm_env: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MF_LLM_TIMEOUT", "0.5")
    # A good answer, 30 s late: a client that waited for it would succeed, so the error
    # itself proves the timeout cut the call (no clock reading needed).
    llm_env.reply(Reply(delay=30.0, body=chat(episode_json()).body))
    err = failure()
    assert isinstance(err, RetryableGenerationError)
    assert str(err) == (f"LLM server http://127.0.0.1:{llm_env.server.server_address[1]} did "
                        "not answer within 0.5 s (MF_LLM_TIMEOUT)")


def test_connection_refused_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MF_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("MF_LLM_MODEL", MODEL)
    monkeypatch.setenv("MF_LLM_API_KEY", KEY)
    err = failure()
    assert isinstance(err, RetryableGenerationError)
    assert str(err).startswith(f"cannot reach the LLM server http://127.0.0.1:{port}: Connect")


def test_the_api_key_never_appears_in_logs_or_error_messages(
    llm_env: FakeLLM, captured_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every error path, including servers that echo the key (whole or as `sk-…xyz`)."""
    echo = f"key {KEY} rejected"
    partial = f"Incorrect API key provided: {KEY[:10]}****{KEY[-6:]}."
    llm_env.reply(error(401, echo), error(401, partial), error(429, echo),
                  error(500, echo), Reply(status=400, body=echo.encode()),
                  chat("not json " + KEY), chat("still not json " + KEY),
                  chat(episode_json(), usage=None))
    messages = [str(failure()) for _ in range(6)]
    generate()
    monkeypatch.setenv("MF_LLM_TIMEOUT", "0.3")
    llm_env.reply(Reply(delay=1.0, body={}))
    messages.append(str(failure()))
    logs = captured_logs.getvalue()
    assert logs  # the estimate and the repair were logged
    for text in [*messages, logs]:
        assert KEY not in text
        assert KEY[:10] not in text and KEY[-6:] not in text
    assert messages[1] == ("LLM server refused the request (HTTP 401: Incorrect API key "
                           "provided: ***)")


def test_redact_key_removes_the_key_and_words_quoting_a_piece_of_it() -> None:
    assert redact_key(f"a {KEY} b", KEY) == "a *** b"
    assert redact_key(f"key={KEY[:12]}…{KEY[-4:]} end", KEY) == "*** end"
    assert redact_key("nothing secret here", KEY) == "nothing secret here"
    assert redact_key("x", None) == "x"


# --------------------------------------------------------------------------------------------
# Cost reservation


def test_estimate_max_usage_bounds_both_calls_of_a_repaired_generation(
    llm_env: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MF_LLM_MAX_TOKENS", "400")
    generator = OpenAICompatibleGenerator(settings=llm_settings())
    request = make_request()
    estimate = generator.estimate_max_usage(request)
    assert estimate.model == MODEL and estimate.completion_tokens == 2 * 400
    prompt_bytes = sum(len(m["content"].encode()) for m in build_messages(request))
    # Both prompts (the second adds the broken reply, at most max_tokens) in bytes: a byte-level
    # tokenizer never makes more tokens than bytes.
    assert estimate.prompt_tokens >= 2 * prompt_bytes + 400
    assert estimate.prompt_tokens < 2 * prompt_bytes + 400 + 1000
    bigger = generator.estimate_max_usage(make_request(
        planning_notes=(PlanningNote("n", "x" * 400),)))
    assert bigger.prompt_tokens > estimate.prompt_tokens


# --------------------------------------------------------------------------------------------
# Through the engine and the CLI


def test_engine_stores_the_episode_with_the_servers_token_counts(
    db_url: str, db: Conn, llm_env: FakeLLM
) -> None:
    t = make_tenant(db, description="Lithium supply chains and refinery permits.")
    note = make_note(db, t["project"], note="More on refinery permits")
    make_note(db, t["project"], note="Battery recycling")
    item = make_queue_item(db, t["project"])
    llm_env.reply(chat(episode_json([note["id"], "note_invented"]), usage=(812, 240)))

    assert run_single(db_url, generator=OPENAI) is Outcome.SUCCESS

    state = item_state(db, item["id"])
    assert state["status"] == "completed"
    # One key per claim: the item's id and this attempt's claim token.
    assert llm_env.seen[0].headers["idempotency-key"] == f"{item['id']}:{state['claim_token']}"
    usage = one(db, "SELECT * FROM token_usage WHERE episode_id = %s", state["episode_id"])
    assert (usage["model"], usage["prompt_tokens"], usage["completion_tokens"]) == (
        MODEL, 812, 240)
    assert usage["cost_gbp"] > 0
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", state["episode_id"])
    assert (episode["status"], episode["title"]) == ("ready", "Refinery permits speed up")
    notes = {r["id"]: r["status"] for r in db.execute("SELECT id, status FROM planning_notes")}
    assert sorted(notes.values()) == ["incorporated", "pending"]
    assert notes[note["id"]] == "incorporated"


def test_engine_puts_a_rate_limited_item_back_after_the_servers_retry_after(
    db_url: str, db: Conn, llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    t = make_tenant(db)
    item = make_queue_item(db, t["project"])
    llm_env.reply(error(429, f"Rate limit reached for {KEY}", **{"Retry-After": "30"}))

    assert run_single(db_url, generator=OPENAI) is Outcome.DEFERRED

    state = item_state(db, item["id"])
    # A rate limit is not a failed attempt: the attempt is given back, the item deferred.
    assert (state["status"], state["attempt_count"]) == ("pending", 0)
    assert (state["deferred_reason"], state["deferred_count"]) == ("rate_limited", 1)
    assert state["last_error"] == "LLM server rate limit (HTTP 429: Rate limit reached for ***)"
    delay = (state["run_after"] - state["last_attempt_at"]).total_seconds()
    assert 29 <= delay <= 31  # the server's 30 s
    # And the whole fleet holds its calls under the key until then.
    hold = one(db, "SELECT * FROM provider_limits")
    assert hold["cooldown_reason"] == "rate_limited"
    assert 29 <= (hold["cooldown_until"] - state["last_attempt_at"]).total_seconds() <= 31
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", state["episode_id"])
    assert episode["status"] == "generating" and episode["generation_attempts"] == 0
    assert KEY not in captured_logs.getvalue()


def test_engine_fails_an_item_at_once_on_401_with_the_message_and_no_key(
    db_url: str, db: Conn, llm_env: FakeLLM, captured_logs: io.StringIO
) -> None:
    t = make_tenant(db)
    item = make_queue_item(db, t["project"])
    llm_env.reply(error(401, f"Incorrect API key provided: {KEY}"))

    assert run_single(db_url, generator=OPENAI) is Outcome.FAILED

    state = item_state(db, item["id"])
    assert (state["status"], state["attempt_count"]) == ("failed", 1)
    assert state["last_error"] == (
        "LLM server refused the request (HTTP 401: Incorrect API key provided: ***)")
    episode = one(db, "SELECT * FROM episodes WHERE id = %s", state["episode_id"])
    assert episode["status"] == "failed" and KEY not in " ".join(episode["generation_errors"])
    assert KEY not in captured_logs.getvalue()
    assert len(llm_env.seen) == 1


def test_cli_generate_prints_the_episode_and_writes_nothing(
    db_url: str, db: Conn, llm_env: FakeLLM
) -> None:
    t = make_tenant(db, title="Lithium 2030", cadence={"mode": "weekdays", "days": []})
    note = make_note(db, t["project"], note="More on refinery permits")
    item = make_queue_item(db, t["project"], scheduled_for=datetime(2026, 3, 2, 9, tzinfo=UTC))
    llm_env.reply(chat(episode_json([note["id"]]), usage=(500, 100)))
    before = item_state(db, item["id"])
    env = worker_env(db_url, MF_GENERATOR=OPENAI, MF_LLM_BASE_URL=llm_env.base_url,
                     MF_LLM_MODEL=MODEL, MF_LLM_API_KEY=KEY)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mf_worker", "generate", *args],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    as_json = cli(t["project"]["id"], "--json")
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown["title"] == "Refinery permits speed up" and shown["written"] is False
    assert (shown["episode_number"], shown["local_date"]) == (1, "2026-03-02")
    assert shown["blocks"][0]["confidence"] == 0.8
    assert shown["usage"][0]["prompt_tokens"] == 500
    assert shown["incorporated_notes"] == [{"id": note["id"], "note": "More on refinery permits"}]
    assert shown["new_memories"][0]["content"] == "Cares about permits"
    assert "every weekday" in llm_env.seen[0].body["messages"][1]["content"]
    # Never the item's own key: a provider must not replay a preview for the real attempt.
    assert llm_env.seen[0].headers["idempotency-key"].startswith("preview-")

    text = cli(t["project"]["id"])
    assert text.returncode == 0, text.stderr
    for expected in ("# Refinery permits speed up", "confidence 0.80",
                     "why: Follows the reader's note on permits.", "500 prompt + 100 completion",
                     f"{note['id']}: More on refinery permits", "Cares about permits",
                     "Nothing was written to the database."):
        assert expected in text.stdout, expected
    assert KEY not in text.stdout + text.stderr + as_json.stderr

    assert item_state(db, item["id"]) == before
    for table in ("episodes", "token_usage", "blocks", "agent_memory", "audit_log"):
        assert one(db, f"SELECT count(*) AS n FROM {table}")["n"] == 0, table
    assert one(db, "SELECT status FROM planning_notes WHERE id = %s", note["id"])["status"] == (
        "pending")

    llm_env.reply(error(401, "Invalid key"))
    refused = cli(t["project"]["id"])
    assert refused.returncode == 1
    assert ("generation failed (the worker would fail the item): LLM server refused the "
            "request (HTTP 401: Invalid key)") in refused.stderr
    missing = cli("prj_nope")
    assert missing.returncode == 1 and "no project 'prj_nope'" in missing.stderr


class CapturingGenerator:
    """Writes the template episode and keeps every request it was given."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        return TemplateGenerator().write(request)


CAPTURE = CapturingGenerator()


def test_generate_builds_the_same_request_as_the_worker(db_url: str, db: Conn) -> None:
    """`mf-worker generate` mirrors the engine's context query: same notes, memories, earlier
    episodes, date, episode number, item and attempt — only the idempotency key differs."""
    t = make_tenant(db, cadence={"mode": "weekly", "days": [3]},
                    memories=Jsonb(["Likes maps", {"content": "Skips jargon", "importance": 0.8}]))
    project = t["project"]
    db.execute("UPDATE users SET timezone = 'Asia/Tokyo' WHERE id = %s", [t["user"]["id"]])
    earlier = make_episode(db, project, sequence_number=1, status="ready", title="First look")
    db.execute("INSERT INTO blocks (id, episode_id, organization_id, content, position) VALUES "
               "('blk_prev', %s, %s, 'It started with permits.', 0)",
               [earlier["id"], project["organization_id"]])
    db.execute("INSERT INTO agent_memory (id, project_id, organization_id, content, importance) "
               "VALUES ('mem_1', %s, %s, 'Reads on Sundays', 0.7)",
               [project["id"], project["organization_id"]])
    for text in ("More on permits", "Less jargon"):
        make_note(db, project, note=text)
    item = make_queue_item(db, project, scheduled_for=datetime(2026, 3, 4, 23, 30, tzinfo=UTC))

    async def preview() -> GenerationRequest:
        conn = await connect(settings_for(db_url))
        async with conn:
            return await build_preview_request(conn, project["id"])

    previewed = asyncio.run(preview())
    CAPTURE.requests.clear()
    assert run_single(db_url, item["id"], generator="tests.test_openai_generator:CAPTURE") is (
        Outcome.SUCCESS)
    (engine,) = CAPTURE.requests

    assert previewed.idempotency_key.startswith("preview-")
    assert engine.idempotency_key.startswith(f"{item['id']}:")
    assert dataclasses.replace(previewed, idempotency_key="k") == dataclasses.replace(
        engine, idempotency_key="k")
    assert previewed.local_date == date(2026, 3, 5) and previewed.episode_number == 2
    assert len(previewed.memories) == 3 and len(previewed.planning_notes) == 2


def test_prompt_parser_rejects_replies_with_no_usable_object() -> None:
    from mf_worker.generators.openai.reply import ReplyError

    for reply, reason in [("", "empty"), ("just words", "no JSON object"),
                          ('{"title": ', "not closed"), ("{oops}", "not valid JSON")]:
        with pytest.raises(ReplyError, match=reason):
            parse_reply(reply)
