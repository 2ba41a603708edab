"""The `email` notifier: an organisation's users hear that it hit its daily cost limit, once per
organisation per day, against a real SMTP server (aiosmtpd) started by the test; a refused
recipient does not stop the others, and a server that is down is retried by the budget loop."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from mf_worker.cost.notify import build_notifier
from mf_worker.db import open_pool
from mf_worker.errors import ConfigError, PluginLoadError
from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop
from mf_worker.settings import load_settings

from .conftest import require_binary, settings_for
from .factories import make_org, make_project, make_queue_item, make_user
from .workers import run_burst

Conn = psycopg.Connection[dict[str, Any]]
TODAY = datetime.now(UTC).date()


@dataclass
class Inbox:
    """An SMTP handler that keeps what it accepts and refuses the addresses it is told to."""

    refuse: set[str] = field(default_factory=set)
    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def inbox(smtp_port: int) -> Iterator[Inbox]:
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    yield handler
    controller.stop()


def org_over_its_limit(db: Conn, *emails: str, name: str = "Acme & Sons") -> dict[str, Any]:
    """An organisation with a £0.50 limit, a user per address and items costing £0.50 each:
    the first generation spends the budget, the rest are blocked."""
    org = make_org(db, name=name, daily_cost_limit_gbp="0.50")
    users = [make_user(db, org, email=address) for address in emails]
    for _ in range(3):
        make_queue_item(db, make_project(db, users[0], title="costly:0.5"))
    return org


def email_settings(smtp_port: int, **extra: Any) -> dict[str, Any]:
    return {"notifier": "log,email", "smtp_url": f"smtp://127.0.0.1:{smtp_port}",
            "mail_from": "Many Futures <costs@example.org>", **extra}


def trip_row(db: Conn, org_id: str) -> dict[str, Any]:
    row = db.execute("SELECT * FROM cost_limit_trips WHERE organization_id = %s",
                     [org_id]).fetchone()
    assert row is not None
    return row


def test_email_tells_the_organisations_users_once_per_day(
    db_url: str, db: Conn, inbox: Inbox, smtp_port: int
) -> None:
    """Both users get one message naming the organisation, the day's spend, the limit and
    when items resume, as plain text and HTML; a second burst the same day sends nothing."""
    org = org_over_its_limit(db, "ada@example.org", "bob@example.org")
    run_burst(db_url, concurrency=1, **email_settings(smtp_port))
    db.execute("UPDATE episode_schedule_queue SET status = 'pending', blocked_on = NULL"
               " WHERE status = 'blocked'")
    run_burst(db_url, concurrency=1, **email_settings(smtp_port))

    assert len(inbox.messages) == 1, "one message per organisation per day"
    recipients, message = inbox.messages[0]
    assert sorted(recipients) == ["ada@example.org", "bob@example.org"]
    assert message["From"] == "Many Futures <costs@example.org>"
    assert "Acme & Sons" in message["Subject"]
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    tomorrow = (TODAY + timedelta(days=1)).isoformat()
    text = plain.get_content()
    for expected in ("Acme & Sons", "£0.50", f"00:00 UTC on {tomorrow}", TODAY.isoformat()):
        assert expected in text, expected
    markup = html.get_content()
    assert "Acme &amp; Sons" in markup and "Acme & Sons" not in markup  # escaped
    assert f"00:00 UTC on {tomorrow}" in markup
    trip = trip_row(db, org["id"])
    assert trip["notified_at"] is not None and trip["last_notify_error"] is None


def test_override_list_replaces_the_organisations_users(
    db_url: str, db: Conn, inbox: Inbox, smtp_port: int
) -> None:
    """MF_MAIL_TO sends to the listed addresses instead of the organisation's users."""
    org_over_its_limit(db, "ada@example.org")
    run_burst(db_url, concurrency=1,
              **email_settings(smtp_port, mail_to="ops@example.org, billing@example.org"))
    assert [sorted(r) for r, _ in inbox.messages] == [["billing@example.org", "ops@example.org"]]


def ours(captured_logs: io.StringIO) -> str:
    """mf-worker's log lines (not those of the test's own SMTP server, in this process)."""
    return "\n".join(line for line in captured_logs.getvalue().splitlines()
                     if '"logger": "mail.log"' not in line)


def test_a_refused_recipient_does_not_stop_the_others(
    db_url: str, db: Conn, inbox: Inbox, smtp_port: int, captured_logs: io.StringIO
) -> None:
    """The server refuses one address: the other still gets the message, the refusal is
    logged with the address's domain (never the whole address: addresses reach only the SMTP
    server), and the trip counts as notified (retrying would not help)."""
    inbox.refuse.add("gone@example.org")
    org = org_over_its_limit(db, "gone@example.org", "bob@example.org")
    run_burst(db_url, concurrency=1, **email_settings(smtp_port))
    assert [r for r, _ in inbox.messages] == [["bob@example.org"]]
    logged = ours(captured_logs)
    assert "notification_recipient_refused" in logged and "***@example.org" in logged
    assert "gone@" not in logged and "bob@" not in logged
    assert trip_row(db, org["id"])["notified_at"] is not None


def test_a_bounce_of_every_recipient_records_and_logs_no_address(
    db_url: str, db: Conn, inbox: Inbox, smtp_port: int, captured_logs: io.StringIO
) -> None:
    """Every address refused: the error recorded on the trip (which the worker's role reads
    across organisations) and the log line name the domains and codes, not the addresses."""
    inbox.refuse.update({"gone@example.org", "lost@example.net"})
    org = org_over_its_limit(db, "gone@example.org", "lost@example.net")
    run_burst(db_url, concurrency=1, **email_settings(smtp_port))
    error = trip_row(db, org["id"])["last_notify_error"]
    assert "refused every recipient" in error and "***@example.net (550)" in error
    for text in (error, ours(captured_logs)):
        assert "gone@" not in text and "lost@" not in text


def test_a_server_that_is_down_is_retried_by_the_budget_loop(
    db_url: str, db: Conn, smtp_port: int
) -> None:
    """With the SMTP server down the trip stays un-notified with the error and a next attempt
    time; once the server is up, the budget loop's next pass after that time sends it."""
    org = org_over_its_limit(db, "ada@example.org")
    settings = settings_for(db_url, **email_settings(smtp_port))
    run_burst(db_url, concurrency=1, **email_settings(smtp_port))
    trip = trip_row(db, org["id"])
    assert trip["notified_at"] is None and trip["notify_attempts"] == 1
    assert f"127.0.0.1:{smtp_port}" in trip["last_notify_error"]
    assert trip["next_notify_at"] > datetime.now(UTC)

    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        async def one_pass(now: datetime) -> None:
            pool = await open_pool(settings, max_size=2)
            try:
                loop = BudgetLoop(
                    pool, BudgetConfig(policy="resume", default_limit=Decimal(50),
                                       reserve_per_item=Decimal("0.5"), interval=60),
                    notifier=build_notifier(settings, pool),
                )
                await loop.run_once(now)
            finally:
                await pool.close()

        asyncio.run(one_pass(datetime.now(UTC)))  # before next_notify_at: nothing yet
        assert handler.messages == []
        asyncio.run(one_pass(trip["next_notify_at"] + timedelta(seconds=1)))
    finally:
        controller.stop()
    assert [r for r, _ in handler.messages] == [["ada@example.org"]]
    trip = trip_row(db, org["id"])
    assert trip["notified_at"] is not None and trip["notify_attempts"] == 2


def test_no_password_is_sent_in_clear_or_shown(
    db_url: str, db: Conn, inbox: Inbox, smtp_port: int, captured_logs: io.StringIO
) -> None:
    """Credentials on a server without STARTTLS: the notifier refuses to log in, says why, and
    the password appears in no log line and no recorded error."""
    org = org_over_its_limit(db, "ada@example.org")
    run_burst(db_url, concurrency=1, **email_settings(
        smtp_port, smtp_url=f"smtp://mailer:s3cr3t-pw@127.0.0.1:{smtp_port}"))
    assert inbox.messages == []
    error = trip_row(db, org["id"])["last_notify_error"]
    assert "STARTTLS" in error and "s3cr3t-pw" not in error
    assert "s3cr3t-pw" not in captured_logs.getvalue()


@pytest.mark.parametrize(("env", "message"), [
    ({"MF_SMTP_URL": "http://mail.example.org"}, "MF_SMTP_URL='***': must be an smtp:// or"),
    ({"MF_SMTP_URL": "smtp://u:pw@:25"}, "must name the server's host"),
    ({"MF_SMTP_URL": "smtp://mail.example.org:99999"}, "port"),
    ({"MF_SMTP_URL": "smtp://mail.example.org?starttls=maybe"}, "starttls must be one of"),
    ({"MF_MAIL_FROM": "nobody"}, "MF_MAIL_FROM='nobody': must be an email address"),
    ({"MF_MAIL_TO": "ops@example.org, nope"}, "MF_MAIL_TO='ops@example.org, nope': 'nope'"),
    ({"MF_NOTIFIER": "log,,email"}, "MF_NOTIFIER='log,,email': an empty entry"),
])
def test_bad_mail_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert message in str(info.value)
    assert "pw" not in str(info.value).replace("***", "")


def test_email_notifier_needs_its_settings(db_url: str) -> None:
    """MF_NOTIFIER=email without MF_SMTP_URL or MF_MAIL_FROM fails at start-up, naming both."""
    settings = settings_for(db_url, notifier="log,email")
    with pytest.raises(PluginLoadError, match="MF_NOTIFIER=email needs MF_SMTP_URL"):
        build_notifier(settings, None)
    settings = settings_for(db_url, notifier="email", smtp_url="smtp://127.0.0.1:25")
    with pytest.raises(PluginLoadError, match="needs MF_MAIL_FROM"):
        build_notifier(settings, None)


def test_email_lookup_answers_only_for_the_organisation_acted_for(db: Conn) -> None:
    """mf_trip_recipients(org) returns org's addresses only inside a transaction acting for
    that organisation, and only while it has a trip of today not yet notified; it is SECURITY
    DEFINER with a fixed search_path and no PUBLIC EXECUTE (which roles may call it:
    tests/test_tenancy.py)."""
    mine = make_org(db)
    other = make_org(db)
    make_user(db, mine, email="me@example.org")
    make_user(db, other, email="them@example.org")
    for org in (mine, other):
        db.execute("INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp)"
                   " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, 1, 1)", [org["id"]])

    def emails(acting_for: str | None, org: str) -> list[str]:
        with db.transaction():
            if acting_for is not None:
                db.execute("SELECT set_config('app.current_org_id', %s, true)", [acting_for])
            rows = db.execute("SELECT e FROM mf_trip_recipients(%s) AS e", [org]).fetchall()
        return [r["e"] for r in rows]

    assert emails(mine["id"], mine["id"]) == ["me@example.org"]
    assert emails(mine["id"], other["id"]) == []
    assert emails(None, mine["id"]) == []
    fn = db.execute(
        "SELECT prosecdef, proconfig, has_function_privilege('public', oid, 'EXECUTE') AS pub"
        " FROM pg_proc WHERE proname = 'mf_trip_recipients'").fetchone()
    assert fn == {"prosecdef": True, "proconfig": ["search_path=pg_catalog, pg_temp"],
                  "pub": False}
    aggregate = db.execute("SELECT prosecdef, proconfig FROM pg_proc"
                           " WHERE proname = 'mf_token_usage_daily_add'").fetchone()
    assert aggregate == {"prosecdef": True, "proconfig": ["search_path=pg_catalog, pg_temp"]}


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, trusted by this process's default TLS context
    (SSL_CERT_FILE), as an operator's own CA would be."""
    openssl = require_binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return cert, key


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_starttls_or_implicit_tls_then_login(
    db_url: str, db: Conn, smtp_port: int, certificate: tuple[Path, Path], scheme: str,
    captured_logs: io.StringIO,
) -> None:
    """smtp:// upgrades with STARTTLS before logging in, smtps:// speaks TLS from the first
    byte; either way the server checks the password and delivers, and the password is logged
    nowhere."""
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cr3t-pw")

    handler = Inbox()
    # aiosmtpd only counts a STARTTLS upgrade as TLS when offering AUTH, so for smtps:// (TLS
    # from the first byte) its check is turned off; the client still refuses plain text.
    tls: dict[str, Any] = ({"tls_context": server_tls, "require_starttls": True} if scheme == "smtp"
           else {"ssl_context": server_tls, "auth_require_tls": False})
    controller = Controller(handler, hostname="127.0.0.1", port=smtp_port,
                            authenticator=authenticator, auth_required=True, **tls)
    controller.start()
    try:
        org = org_over_its_limit(db, "ada@example.org")
        query = "?starttls=require" if scheme == "smtp" else ""
        run_burst(db_url, concurrency=1, **email_settings(
            smtp_port, smtp_url=f"{scheme}://mailer:s3cr3t-pw@127.0.0.1:{smtp_port}{query}"))
    finally:
        controller.stop()
    assert logins == [(b"mailer", b"s3cr3t-pw")], trip_row(db, org["id"])["last_notify_error"]
    assert [r for r, _ in handler.messages] == [["ada@example.org"]]
    assert trip_row(db, org["id"])["notified_at"] is not None
    assert "s3cr3t-pw" not in captured_logs.getvalue()


def test_starttls_require_refuses_a_server_without_it(
    db_url: str, db: Conn, inbox: Inbox, smtp_port: int
) -> None:
    """?starttls=require: a server that does not offer STARTTLS gets nothing, and the trip
    records why."""
    org = org_over_its_limit(db, "ada@example.org")
    run_burst(db_url, concurrency=1, **email_settings(
        smtp_port, smtp_url=f"smtp://127.0.0.1:{smtp_port}?starttls=require"))
    assert inbox.messages == []
    assert "does not offer STARTTLS" in trip_row(db, org["id"])["last_notify_error"]


def notification_counts(db_url: str, **overrides: Any) -> dict[str, float]:
    """Run a burst as the daemon assembles it and read its notification counter."""
    from mf_worker.daemon import build, serve
    from mf_worker.generation import load_generator

    settings = settings_for(db_url, poll_interval=0.05, concurrency=1, **overrides)

    async def main() -> dict[str, float]:
        components = await build(settings, generator=load_generator("tests.generators:scripted"),
                                 scheduler=False)
        await serve(components, burst=True, install_signals=False)
        registry = components.metrics.registry
        return {outcome: registry.get_sample_value(
            "mf_worker_cost_limit_notifications_total", {"outcome": outcome}) or 0.0
            for outcome in ("delivered", "failed")}

    return asyncio.run(main())


def test_notification_outcomes_are_counted(
    db_url: str, db: Conn, smtp_port: int
) -> None:
    """mf_worker_cost_limit_notifications_total counts a failed send (server down) and a
    delivered one, so an alert can say that organisations are not hearing of their limit."""
    org_over_its_limit(db, "ada@example.org")
    assert notification_counts(db_url, **email_settings(smtp_port)) == {
        "delivered": 0.0, "failed": 1.0}
    org_over_its_limit(db, "bob@example.org", name="Other Org")
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        assert notification_counts(db_url, **email_settings(smtp_port)) == {
            "delivered": 1.0, "failed": 0.0}
    finally:
        controller.stop()
