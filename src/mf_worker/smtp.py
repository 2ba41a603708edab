"""Parsing the mail settings: ``MF_SMTP_URL``, ``MF_MAIL_FROM`` and ``MF_MAIL_TO``.

Standard library only, so the settings module can validate them without importing the
notifier (and the database layer behind it).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Final

__all__ = ["STARTTLS_MODES", "SmtpTarget", "parse_address", "parse_address_list",
           "parse_smtp_url"]

STARTTLS_MODES: Final = ("auto", "require", "off")


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    """Where and how to send: parsed from ``MF_SMTP_URL``."""

    host: str
    port: int
    implicit_tls: bool
    starttls: str
    username: str | None
    password: str | None

    @property
    def where(self) -> str:
        """host:port, safe to show (no credentials)."""
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"SmtpTarget({self.where}, tls={self.implicit_tls}, starttls={self.starttls})"


def parse_smtp_url(raw: str) -> SmtpTarget:
    """``smtp://[user[:password]@]host[:port][?starttls=auto|require|off]`` (port 587 by
    default) or ``smtps://…`` (port 465). ValueError with a reason that never quotes the
    password."""
    text = raw.strip()
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in ("smtp", "smtps"):
        raise ValueError("must be an smtp:// or smtps:// URL (e.g. smtp://mail.example.org:587)")
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port (1-65535)") from None
    if not parts.hostname:
        raise ValueError("must name the server's host")
    if parts.path not in ("", "/"):
        raise ValueError("must not have a path")
    options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(options) - {"starttls"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} (known: starttls)")
    implicit = scheme.lower() == "smtps"
    starttls = options.get("starttls", ["auto"])[-1].lower()
    if starttls not in STARTTLS_MODES:
        raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}")
    if implicit and starttls == "require":
        starttls = "off"  # smtps:// is TLS from the start
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return SmtpTarget(parts.hostname, port or (465 if implicit else 587), implicit,
                      "off" if implicit else starttls, username, password)


def parse_address(raw: str) -> str:
    """One mail address, optionally with a display name (``Name <a@b>``); returned as given."""
    text = raw.strip()
    _name, address = parseaddr(text)
    if "@" not in address or address.startswith("@") or address.endswith("@") or any(
        c.isspace() for c in address
    ):
        raise ValueError("must be an email address (e.g. costs@example.org)")
    return text


def parse_address_list(raw: str) -> tuple[str, ...]:
    """Comma-separated addresses (bare, no display names)."""
    found: list[str] = []
    for entry in raw.split(","):
        address = entry.strip()
        try:
            if parseaddr(address)[1] != address:
                raise ValueError
            parse_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an email address") from None
        found.append(address)
    return tuple(found)
