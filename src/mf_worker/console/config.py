"""The console's settings: the ``MF_CONSOLE_*`` variables, declared once.

Registered as the ``mf_worker.settings`` entry point ``console``, so they are parsed and
validated at start-up with every other setting, ``mf-worker config`` shows them and the README
documents them. Standard library and `mf_worker.settings` only: no web dependency here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from mf_worker.settings import Secret, number, secret_text, setting, text

__all__ = ["ConsoleSettings", "parse_addr"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_addr(raw: str) -> tuple[str, int]:
    """``host:port`` into its parts (``[::1]:8080`` for IPv6); ValueError otherwise."""
    host, sep, port = raw.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be host:port (e.g. 127.0.0.1:8080)")
    return host, int(port)


def _addr(raw: str) -> str:
    parse_addr(raw)
    return raw.strip()


def _path(raw: str) -> Path:
    return Path(raw.strip()).expanduser()


def _networks(raw: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDR networks (``10.0.0.0/8, 127.0.0.1``)."""
    found: list[Network] = []
    for part in (p.strip() for p in raw.split(",")):
        if part:
            try:
                found.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network") from None
    return tuple(found)


def _header(raw: str) -> str:
    name = raw.strip()
    if name and not all(c.isalnum() or c == "-" for c in name):
        raise ValueError("must be an HTTP header name (letters, digits and dashes)")
    return name.lower()


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """The ``MF_CONSOLE_*`` variables of `mf-worker console` (docs/console.md)."""

    addr: str = setting(
        "MF_CONSOLE_ADDR", "127.0.0.1:8080", _addr,
        "`console`: host:port the operator console listens on (keep it on loopback or a "
        "private network, behind a TLS-terminating proxy: docs/console.md).",
    )
    users_file: Path | None = setting(
        "MF_CONSOLE_USERS_FILE", None, _path,
        "`console`: the file of console users, their roles and password hashes, written by "
        "`mf-worker console add-user` (mode 0600). Required unless every user signs in "
        "through a trusted proxy (`MF_CONSOLE_USER_HEADER`).",
    )
    secret_key: Secret | None = setting(
        "MF_CONSOLE_SECRET_KEY", None, secret_text,
        "`console`: key that signs session cookies; give every replica the same one (at least "
        "32 characters; also read: the systemd credential `mf_console_secret_key`). Unset: a "
        "random key per process, so sessions end at a restart.",
        secret=True, credential="mf_console_secret_key",
    )
    session_hours: float = setting(
        "MF_CONSOLE_SESSION_HOURS", 12.0, number(0.0, exclusive=True, maximum=24.0 * 30),
        "`console`: hours a sign-in lasts.",
    )
    trusted_proxies: tuple[Network, ...] = setting(
        "MF_CONSOLE_TRUSTED_PROXIES", (), _networks,
        "`console`: comma-separated addresses or networks of the reverse proxies in front of "
        "the console: only their `X-Forwarded-Proto`/`-For` and user header are believed.",
    )
    user_header: str = setting(
        "MF_CONSOLE_USER_HEADER", "", _header,
        "`console`: a header naming the signed-in user, set by a trusted proxy that did the "
        "sign-in (e.g. `X-Forwarded-User` from oauth2-proxy); accepted only from "
        "`MF_CONSOLE_TRUSTED_PROXIES`. The user's role comes from the users file, else "
        "`viewer`. Empty: off.",
        empty_ok=True,
    )
    title: str = setting(
        "MF_CONSOLE_TITLE", "mf-worker console", text,
        "`console`: the title shown on every page (name the environment: `mf-worker (prod)`).",
    )
