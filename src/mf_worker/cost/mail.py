"""The ``email`` notifier: an organisation's users hear that it reached its daily cost limit.

The seed's circuit breaker calls ``sendLimitExceededEmail(orgId)``; this is that mail. It goes
through the operator's SMTP server (``MF_SMTP_URL``: ``smtp://`` with STARTTLS, or ``smtps://``
with TLS from the first byte) from ``MF_MAIL_FROM`` to the organisation's users, or to the
``MF_MAIL_TO`` list instead. The message (plain text and HTML) names the organisation, the day's
spend, the limit and when the items resume.

Who receives it is looked up per trip, acting for the organisation: its name from
``organizations`` (the worker's pool), and its users' addresses through
``public.mf_trip_recipients()``, a SECURITY DEFINER function that answers only while the
organisation has a trip of today not yet notified, called as the mail role
(``MF_MAIL_DATABASE_URL``, one short connection per mail): the worker's role can read no
address at all. With ``MF_MAIL_TO`` set, no address is read from the database at all. An
address never goes further than the SMTP server: log lines and recorded errors show its domain
only (``***@example.org``).

Sending uses the standard library's smtplib in a thread, a few quick retries for a connection
problem; what still fails is raised, the trip stays un-notified, and the budget loop tries
again later (``cost_limit_trips.next_notify_at``). A recipient the server refuses is logged and
skipped: the others still get the mail, and retrying would not change the answer. The password
is never logged and never sent over an unencrypted connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import re
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr

import psycopg
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from ..backoff import Backoff
from ..db import Connection, Pool, as_org, connect
from ..db.sql import load_queries
from ..errors import MfWorkerError, describe_error
from ..logs import get_logger
from ..settings import Settings
from ..smtp import SmtpTarget
from .budget import Trip

__all__ = [
    "EmailNotifier",
    "MailError",
    "OrgContacts",
    "PermanentMailError",
    "database_contacts",
    "hide_addresses",
    "mail_settings",
]

_Q = load_queries(__package__ or "mf_worker.cost", "mail.sql")

class MailError(MfWorkerError):
    """The mail could not be handed to the SMTP server (worth retrying later)."""


class PermanentMailError(MailError):
    """The SMTP server (or the settings) refuse in a way a retry will not change."""


@dataclass(frozen=True, slots=True)
class OrgContacts:
    """The organisation's name and the addresses to write to."""

    name: str
    emails: tuple[str, ...]


ContactLookup = Callable[[str, bool], Awaitable[OrgContacts]]


def database_contacts(pool: Pool | None, mail_database: Settings | None = None
                      ) -> ContactLookup:
    """Looks the organisation up acting for it; its users' addresses only when asked, as the
    mail role: through ``mail_database`` (settings whose database URL is the mail role's,
    `mail_settings`) when given, else through ``pool`` (the schema owner, in development)."""

    async def lookup(organization_id: str, with_emails: bool) -> OrgContacts:
        if pool is None:
            raise MailError("no database pool to look the organisation up in")
        async with pool.connection() as conn, as_org(conn, organization_id):
            row = await (await conn.execute(
                _Q["get_organization_name"], {"organization_id": organization_id}
            )).fetchone()
        emails: tuple[str, ...] = ()
        if with_emails:
            if mail_database is None:
                async with pool.connection() as conn:
                    emails = await _recipients(conn, organization_id)
            else:
                try:
                    mail_conn = await connect(mail_database)
                except psycopg.OperationalError as exc:
                    raise MailError("cannot connect as the mail role (MF_MAIL_DATABASE_URL): "
                                    f"{describe_error(exc)}") from None
                async with mail_conn:
                    emails = await _recipients(mail_conn, organization_id)
        return OrgContacts(row["name"] if row else organization_id, emails)

    return lookup


def mail_settings(settings: Settings) -> Settings | None:
    """``settings`` with the mail role's login as the database URL (MF_MAIL_DATABASE_URL), or
    None when it is not set."""
    if settings.mail_database_url is None:
        return None
    return dataclasses.replace(settings, database_url=settings.mail_database_url)


async def _recipients(conn: Connection, organization_id: str) -> tuple[str, ...]:
    try:
        async with as_org(conn, organization_id):
            cur = await conn.execute(_Q["list_trip_recipients"],
                                     {"organization_id": organization_id})
            return tuple(r["email"] for r in await cur.fetchall())
    except psycopg.errors.InsufficientPrivilege:
        raise PermanentMailError(
            "this database role may not read the organisation's addresses "
            "(mf_trip_recipients): set MF_MAIL_DATABASE_URL to the mail role's login "
            "(docs/database-roles.sql, mail_password), or MF_MAIL_TO") from None


_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"'@]+@(?=[^\s<>@]+)")


def hide_addresses(text: str) -> str:
    """``text`` with every mail address's local part replaced by ``***`` (the domain stays,
    which is what a bounce usually needs): what log lines and recorded errors may show."""
    return _ADDRESS.sub("***@", text)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, MailError) and not isinstance(exc, PermanentMailError)


class EmailNotifier:
    """Writes to the organisation's users (or ``mail_to``) when it hits its daily limit."""

    def __init__(
        self, target: SmtpTarget, mail_from: str, contacts: ContactLookup, *,
        mail_to: tuple[str, ...] | None = None, policy: str = "resume", timeout: float = 10.0,
        attempts: int = 3, backoff: float = 0.5,
    ) -> None:
        self.target, self.mail_from, self.mail_to = target, mail_from, mail_to
        self._contacts, self.policy, self.timeout = contacts, policy, timeout
        self.attempts = attempts
        # 0.5, 1, 2 … s between attempts, at most 10 s (the webhook's rule).
        self.backoff = Backoff(initial=min(backoff, 10.0), factor=2.0, cap=10.0)
        self._log = get_logger("mf_worker.notify")

    async def notify(self, trip: Trip) -> None:
        contacts = await self._contacts(trip.organization_id, self.mail_to is None)
        recipients = self.mail_to or contacts.emails
        if not recipients:
            raise MailError(
                f"organisation {trip.organization_id}: no address to write to (no users, or "
                "its trip is no longer today's and undelivered)")
        message = self.compose(trip, contacts.name, recipients)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=self.backoff.wait,
            stop=stop_after_attempt(self.attempts),
            reraise=True,
        ):
            with attempt:
                refused = await asyncio.to_thread(self._send, message, list(recipients))
        if refused:
            self._log.warning(
                "notification_recipient_refused", organization_id=trip.organization_id,
                recipients=sorted(hide_addresses(a) for a in refused),
                replies=[hide_addresses(f"{code} {reply.decode(errors='replace')}")
                         for code, reply in refused.values()],
            )

    def compose(self, trip: Trip, org_name: str, recipients: tuple[str, ...]) -> EmailMessage:
        """The message: plain text with an HTML alternative."""
        resume_day = (trip.date + timedelta(days=1)).isoformat()
        spent, limit = f"£{trip.spent_gbp:.2f}", f"£{trip.limit_gbp:.2f}"
        if self.policy == "skip":
            resume = (f"Episodes that fell due today are skipped; the next regular ones run "
                      f"from 00:00 UTC on {resume_day}, or as soon as the limit is raised.")
        else:
            resume = (f"Paused episodes resume at 00:00 UTC on {resume_day}, or as soon as the "
                      f"limit is raised.")
        lines = [
            f"{org_name} has reached its daily AI cost limit.",
            "",
            f"Spent on {trip.date.isoformat()} (UTC): {spent}",
            f"Daily limit: {limit}",
            f"Episodes paused: {trip.blocked_items}",
            "",
            resume,
            "",
            "To raise the limit, contact your Many Futures administrator.",
        ]
        message = EmailMessage()
        message["Subject"] = f"{org_name}: daily AI cost limit reached"
        message["From"] = self.mail_from
        message["To"] = ", ".join(recipients)
        message["Date"] = formatdate(localtime=False, usegmt=True)
        domain = parseaddr(self.mail_from)[1].rpartition("@")[2] or None
        message["Message-ID"] = make_msgid(domain=domain)
        message.set_content("\n".join(lines) + "\n")
        e = html.escape
        message.add_alternative(
            "<!DOCTYPE html>\n<html><body>\n"
            f"<p><strong>{e(org_name)}</strong> has reached its daily AI cost limit.</p>\n"
            "<table>\n"
            f"<tr><th align=\"left\">Spent on {e(trip.date.isoformat())} (UTC)</th>"
            f"<td>{e(spent)}</td></tr>\n"
            f"<tr><th align=\"left\">Daily limit</th><td>{e(limit)}</td></tr>\n"
            f"<tr><th align=\"left\">Episodes paused</th><td>{trip.blocked_items}</td></tr>\n"
            "</table>\n"
            f"<p>{e(resume)}</p>\n"
            "<p>To raise the limit, contact your Many Futures administrator.</p>\n"
            "</body></html>\n",
            subtype="html",
        )
        return message

    def _send(self, message: EmailMessage, recipients: list[str]
              ) -> dict[str, tuple[int, bytes]]:
        """Hand the message to the server; returns the recipients it refused (when it took
        the message for the others). Errors name the server, never the credentials."""
        t = self.target
        context = ssl.create_default_context()
        try:
            client = (smtplib.SMTP_SSL(t.host, t.port, timeout=self.timeout, context=context)
                      if t.implicit_tls else smtplib.SMTP(t.host, t.port, timeout=self.timeout))
        except (OSError, smtplib.SMTPException) as exc:
            raise MailError(f"SMTP server {t.where} unreachable: {_reason(exc)}") from None
        try:
            with client:
                client.ehlo()
                encrypted = t.implicit_tls
                if not t.implicit_tls and t.starttls != "off":
                    if client.has_extn("starttls"):
                        client.starttls(context=context)
                        client.ehlo()
                        encrypted = True
                    elif t.starttls == "require":
                        raise PermanentMailError(
                            f"SMTP server {t.where} does not offer STARTTLS (starttls=require)")
                if t.username is not None:
                    if not encrypted:
                        raise PermanentMailError(
                            f"SMTP server {t.where} offers no STARTTLS: the password is never "
                            "sent unencrypted (use smtps://, or a server with STARTTLS)")
                    client.login(t.username, t.password or "")
                refused: dict[str, tuple[int, bytes]] = client.send_message(
                    message, from_addr=parseaddr(self.mail_from)[1], to_addrs=recipients)
                return refused
        except smtplib.SMTPRecipientsRefused as exc:
            replies = ", ".join(f"{hide_addresses(addr)} ({code})"
                                for addr, (code, _) in exc.recipients.items())
            if all(code >= 500 for code, _ in exc.recipients.values()):
                raise PermanentMailError(
                    f"SMTP server {t.where} refused every recipient: {replies}") from None
            raise MailError(f"SMTP server {t.where} deferred the recipients: {replies}") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise PermanentMailError(
                f"SMTP server {t.where} refused the login of {t.username!r}: {exc.smtp_code}"
            ) from None
        except smtplib.SMTPResponseException as exc:
            error = PermanentMailError if exc.smtp_code >= 500 else MailError
            raise error(f"SMTP server {t.where} answered {exc.smtp_code}: "
                        f"{_reason(exc)}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise MailError(f"SMTP server {t.where} failed: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The server's words, without the addresses it may quote."""
    if isinstance(exc, smtplib.SMTPResponseException):
        message = exc.smtp_error
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    else:
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return hide_addresses(text)
