"""The console's defences: signed session cookies, CSRF tokens, the sign-in rate limit, the
trusted proxy check and the response headers (a strict Content-Security-Policy).

The session is a cookie signed with itsdangerous (HttpOnly, SameSite=Strict, Secure when the
request came over TLS, directly or through a trusted proxy's ``X-Forwarded-Proto``), holding
the user's name and a CSRF token; it is re-checked against the users file on every request,
so it carries no authority of its own beyond the signature and its age.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from itsdangerous import BadSignature, URLSafeTimedSerializer

from .config import Network

__all__ = [
    "COOKIE",
    "CSP",
    "SECURITY_HEADERS",
    "LoginLimiter",
    "Session",
    "SessionCodec",
    "csrf_matches",
    "from_trusted_proxy",
]

COOKIE: Final = "mf_console"
# Nothing runs but our own script files, nothing loads from elsewhere, no page frames ours, and
# forms post only here: a script that slips through the sanitiser still cannot run.
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Final = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
}


@dataclass(slots=True)
class Session:
    """What the cookie holds: the signed-in user's name (None before sign-in) and the CSRF
    token every form must echo."""

    user: str | None = None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


class SessionCodec:
    """Signs and checks session cookies; a cookie older than ``max_age`` seconds is void."""

    def __init__(self, secret_key: str, max_age: float) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt="mf-console-session")
        self.max_age = max_age

    def dumps(self, session: Session) -> str:
        return self._serializer.dumps({"u": session.user, "c": session.csrf})

    def loads(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            data: Any = self._serializer.loads(cookie, max_age=int(self.max_age))
        except BadSignature:  # SignatureExpired is a BadSignature too
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        user = data.get("u")
        return Session(user=user if isinstance(user, str) else None, csrf=data["c"])


def csrf_matches(session: Session, submitted: object) -> bool:
    """The form's token is the session's (compared in constant time)."""
    return isinstance(submitted, str) and hmac.compare_digest(
        submitted.encode(), session.csrf.encode())


def from_trusted_proxy(client_host: str | None, trusted: tuple[Network, ...]) -> bool:
    """The peer's address is one of the configured proxies'."""
    if not client_host or not trusted:
        return False
    try:
        address = ipaddress.ip_address(client_host)
    except ValueError:
        return False
    return any(address in network for network in trusted)


class LoginLimiter:
    """At most ``attempts`` failed sign-ins per ``window`` seconds per client address and per
    user name; beyond that, sign-in is refused until the oldest failure ages out. In memory:
    each replica counts its own (a proxy spreading an attacker over N replicas gives N times
    the budget, still a handful a minute)."""

    def __init__(self, attempts: int = 5, window: float = 300.0) -> None:
        self.attempts = attempts
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, *keys: str, now: float | None = None) -> float:
        """Seconds until a sign-in for these keys is allowed again; 0 when it is now."""
        now = time.monotonic() if now is None else now
        waits = [times[0] + self.window - now for key in keys
                 if len(times := self._recent(key, now)) >= self.attempts]
        if len(self._failures) > 10_000:  # forget keys with nothing recent
            for key in [k for k, v in self._failures.items() if not self._recent(k, now)]:
                del self._failures[key]
        return max(waits, default=0.0)

    def failed(self, *keys: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in keys:
            self._recent(key, now).append(now)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)
