"""Settings: validated at start-up, errors name the variable, secrets never leak, typos warned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mf_worker.errors import ConfigError
from mf_worker.settings import describe_settings, load_settings, redact_conninfo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MF_CONCURRENCY": "abc"}, "MF_CONCURRENCY='abc': must be a whole number"),
        ({"MF_CONCURRENCY": "0"}, "MF_CONCURRENCY='0': must be at least 1"),
        ({"MF_POLL_INTERVAL": "soon"}, "MF_POLL_INTERVAL='soon': must be a number"),
        ({"MF_POLL_INTERVAL": "nan"}, "MF_POLL_INTERVAL='nan': must be a finite number"),
        ({"MF_LISTEN": "maybe"}, "MF_LISTEN='maybe': must be one of on/off"),
        ({"MF_LOG_FORMAT": "xml"}, "MF_LOG_FORMAT='xml': must be one of auto, json, console"),
        ({"MF_LEASE_SECONDS": "1"}, "MF_LEASE_SECONDS='1': must be at least 2"),
        ({"MF_LEAD_SECONDS": "-1"}, "MF_LEAD_SECONDS='-1': must be at least 0"),
        ({"MF_LEAD_SECONDS": "86400"}, "MF_LEAD_SECONDS='86400': must be at most 21600"),
        ({"MF_DATABASE_URL": "mysql://x"}, "MF_DATABASE_URL='***': must be a postgresql:// URL"),
        ({"MF_DATABASE_URL": "just words"}, "MF_DATABASE_URL='***': must be a postgresql://"),
    ],
)
def test_bad_value_is_rejected_with_the_variable_and_value(
    env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value).startswith(expected)


def test_unparsable_database_url_does_not_show_the_password() -> None:
    url = "postgresql://worker:hunter2secret@db.internal:5432/mf?sslmode=bogus&x=%zz"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MF_DATABASE_URL": url})
    assert "MF_DATABASE_URL" in str(info.value)
    assert "hunter2secret" not in str(info.value)


def test_database_url_falls_back_to_database_url_and_is_masked_in_repr() -> None:
    settings, _ = load_settings(environ={"DATABASE_URL": "postgresql://u:pw1234@h/db"})
    assert settings.require_database_url() == "postgresql://u:pw1234@h/db"
    assert "pw1234" not in repr(settings)
    preferred, _ = load_settings(environ={"DATABASE_URL": "postgresql://h/a",
                                          "MF_DATABASE_URL": "postgresql://h/b"})
    assert preferred.require_database_url().endswith("/b")


def test_flags_override_the_environment_and_are_named_in_errors() -> None:
    settings, _ = load_settings(environ={"MF_CONCURRENCY": "2"}, overrides={"concurrency": "9"})
    assert settings.concurrency == 9
    with pytest.raises(ConfigError, match=r"^--concurrency='-1': must be at least 1"):
        load_settings(environ={}, overrides={"concurrency": "-1"})


def test_unknown_mf_variable_is_warned_by_name() -> None:
    _, warnings = load_settings(environ={"MF_CONCURENCY": "8", "OTHER": "x"})
    assert len(warnings) == 1 and "MF_CONCURENCY" in warnings[0]


def test_defaults_without_environment() -> None:
    settings, warnings = load_settings(environ={})
    assert (settings.concurrency, settings.max_attempts, settings.lease_seconds) == (4, 3, 120.0)
    assert settings.database_url is None and warnings == []
    assert settings.pool_size == settings.concurrency + 4
    many, _ = load_settings(environ={"MF_CONCURRENCY": "256"})
    assert many.pool_size == 20
    with pytest.raises(ConfigError, match="MF_DATABASE_URL is not set"):
        settings.require_database_url()


def test_redact_conninfo_masks_url_and_keyword_passwords() -> None:
    assert redact_conninfo("postgresql://u:p4ss@h/db") == "postgresql://u:***@h/db"
    assert "s3cret" not in redact_conninfo("host=h password=s3cret dbname=x")


def test_readme_embeds_the_current_settings_table() -> None:
    """Every setting is documented where an operator looks, exactly as the code declares it."""
    from mf_worker.cli import settings_markdown_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_markdown_table() in readme, "regenerate with `make readme`"
    assert all(f"`{s.env}`" in readme for s in describe_settings())


def test_cli_bad_setting_exits_2_with_one_line_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.update({"MF_CONCURRENCY": "abc", "MF_DATABASE_URL": "postgresql://u:topsecret@h/db"})
    result = subprocess.run(
        [sys.executable, "-m", "mf_worker", "migrate"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mf-worker: error: MF_CONCURRENCY='abc': must be a whole number"
    ]
    assert result.stdout == ""


def test_cli_connection_failure_never_prints_the_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env["MF_DATABASE_URL"] = "postgresql://u:topsecret@127.0.0.1:1/db?connect_timeout=2"
    result = subprocess.run(
        [sys.executable, "-m", "mf_worker", "migrate"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "cannot connect to the database" in result.stderr
    assert "topsecret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [("MF_LLM_REQUESTS_PER_MINUTE", "lots", "must be a number"),
     ("MF_LLM_REQUESTS_PER_MINUTE", "-5", "must be greater than 0"),
     ("MF_LLM_TOKENS_PER_MINUTE", "1e5x", "must be a number"),
     ("MF_LLM_TOKENS_PER_MINUTE", "-1", "must be greater than 0"),
     ("MF_RETRY_DEADLINE", "forever", "must be a number"),
     ("MF_ORG_MAX_IN_FLIGHT", "-2", "must be at least 1")],
)
def test_cli_a_bad_flow_control_setting_stops_start_up_with_exit_2_naming_it(
    name: str, raw: str, problem: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    env.update({name: raw, "MF_DATABASE_URL": "postgresql://u@127.0.0.1:1/db"})
    result = subprocess.run(
        [sys.executable, "-m", "mf_worker", "run"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mf-worker: error: {name}='{raw}': {problem}"]


def test_flow_control_settings_are_unset_by_default_and_parsed_when_given() -> None:
    settings, warnings = load_settings(environ={})
    assert (settings.llm_requests_per_minute, settings.llm_tokens_per_minute) == (None, None)
    assert settings.org_max_in_flight is None and settings.retry_deadline == 4 * 3600
    settings, warnings = load_settings(environ={
        "MF_LLM_REQUESTS_PER_MINUTE": "120", "MF_LLM_TOKENS_PER_MINUTE": "150_000",
        "MF_RETRY_DEADLINE": "600", "MF_ORG_MAX_IN_FLIGHT": "4"})
    assert warnings == []
    assert (settings.llm_requests_per_minute, settings.llm_tokens_per_minute) == (120, 150_000)
    assert (settings.retry_deadline, settings.org_max_in_flight) == (600, 4)
