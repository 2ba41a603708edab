"""No password of a URL-valued setting shows anywhere: not in `mf-worker config` (text and
--json), not in a log line, not in an error message.

The URL-valued settings are found, not listed: every setting (core or a registered plugin's)
whose variable ends in ``_URL``, each given a URL with a password that its own parser accepts;
the database URLs also as libpq ``key=value`` and ``?password=`` forms. Each case uses its own
password, since the masking remembers every secret it was told for the whole process.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import pytest
from typer.testing import CliRunner

from mf_worker.cli import app
from mf_worker.errors import ConfigError
from mf_worker.logs import configure_logging, get_logger
from mf_worker.settings import describe_settings, load_settings

FORMS = (
    "postgresql://mf:{pw}@db.example.org:5432/mf",
    "http://llm:{pw}@llm.example.org:8080/v1",
    "https://hook:{pw}@hooks.example.org/notify",
    "smtp://mailer:{pw}@mail.example.org:587",
)
DATABASE_FORMS = (
    "host=db.example.org password={pw} dbname=mf user=mf",
    "host=db.example.org password='{pw}' dbname=mf",
    "postgresql://mf@db.example.org/mf?sslmode=require&password={pw}",
)
URL_SETTINGS = sorted(s.env for s in describe_settings() if s.env.endswith("_URL"))


def accepted_form(env: str) -> str:
    """The first URL form (with ``{pw}``) the setting's parser accepts."""
    for form in FORMS:
        try:
            load_settings(environ={env: form.format(pw="probe-pw")})
        except ConfigError:
            continue
        return form
    raise AssertionError(f"{env}: no URL form is accepted")


CASES = [pytest.param(env, accepted_form(env), id=env) for env in URL_SETTINGS] + [
    pytest.param(env, form, id=f"{env}-{i}")
    for env in ("MF_DATABASE_URL", "MF_MAIL_DATABASE_URL") if env in URL_SETTINGS
    for i, form in enumerate(DATABASE_FORMS)
]


def a_password() -> str:
    return f"pw{uuid.uuid4().hex[:12]}"


def test_the_url_valued_settings_are_found() -> None:
    """The cases cover the settings the issue names (and any other ``*_URL`` one)."""
    assert {"MF_DATABASE_URL", "MF_LLM_BASE_URL", "MF_NOTIFY_WEBHOOK_URL",
            "MF_SMTP_URL"} <= set(URL_SETTINGS)


def run_cli(args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(app, args, env=env, catch_exceptions=False)


@pytest.mark.parametrize(("env", "form"), CASES)
def test_config_shows_a_url_setting_with_its_password_masked(env: str, form: str) -> None:
    """`config` and `config --json` show the setting (masked) and never its password."""
    password = a_password()
    raw = form.format(pw=password)
    text = run_cli(["config"], {env: raw})
    assert text.exit_code == 0, text.output
    as_json = run_cli(["config", "--json"], {env: raw})
    assert as_json.exit_code == 0, as_json.output
    for output in (text.output, as_json.output):
        assert password not in output
    shown = next(r["value"] for r in json.loads(as_json.output) if r["variable"] == env)
    assert isinstance(shown, str) and "***" in shown
    assert shown == "***" or "example.org" in shown  # recognisable, unless wholly secret
    assert any(line.startswith(env) and "***" in line for line in text.output.splitlines())


@pytest.mark.parametrize(("env", "form"), CASES)
def test_a_log_line_never_carries_a_url_settings_password(
    env: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a command has read its settings, a log line that quotes the URL (as a library's
    error may), the bare password, or an exception about either shows neither: structlog's
    lines and the standard library's alike, JSON and console."""
    from mf_worker.cli.common import build_settings

    password = a_password()
    raw = form.format(pw=password)
    monkeypatch.setenv(env, raw)
    build_settings()
    for log_format in ("json", "console"):
        buffer = io.StringIO()
        configure_logging(log_format, "debug", stream=buffer)
        try:
            log = get_logger("mf_worker.test")
            log.error("request_failed", error=f"cannot reach {raw}", detail=[password])
            logging.getLogger("some.library").warning("retrying %s", raw)
            try:
                raise RuntimeError(f"authentication failed for {password} at {raw}")
            except RuntimeError:
                log.exception("unexpected")
        finally:
            configure_logging("json", "warning")
        logged = buffer.getvalue()
        assert "request_failed" in logged and "retrying" in logged and "unexpected" in logged
        assert password not in logged, logged


@pytest.mark.parametrize(("env", "form"), CASES)
def test_an_error_message_about_a_url_setting_never_shows_its_password(
    env: str, form: str
) -> None:
    """A value its parser refuses (a URL of another scheme, a libpq string that does not
    parse) stops the command with one line naming the variable, and no password; so does the
    ConfigError itself."""
    password = a_password()
    good = form.format(pw=password)
    for raw in (good.replace("://", "+ftp://", 1) if "://" in good else f"{good} broken",
                good.replace("://", ":/", 1) if "://" in good else f"broken {good}"):
        with pytest.raises(ConfigError) as info:
            load_settings(environ={env: raw})
        assert env in str(info.value) and password not in str(info.value)
        result = run_cli(["config"], {env: raw})
        assert result.exit_code == 2
        assert env in result.output and password not in result.output
