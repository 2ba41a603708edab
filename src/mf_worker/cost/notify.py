"""Telling people that an organisation hit its daily cost limit, or operators that the
LLM provider's quota is exhausted: the notifier plugins.

``log`` (the default) writes a warning line; ``webhook`` POSTs the trip as JSON to
``MF_NOTIFY_WEBHOOK_URL`` with a timeout and retries (:class:`Backoff`), using only the standard
library in a thread; ``email`` writes to the organisation's users (``mail``). A third-party
notifier is any object with ``async notify(trip)``, loaded by ``module:attr``. ``MF_NOTIFIER``
lists several (``log,webhook,email``): each is tried, and the trip counts as notified when all
succeeded. A notifier that fails is logged, never fatal (the items are blocked either way), and
the budget loop tries the trip again later: notifications are at least once.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol, runtime_checkable

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from ..backoff import Backoff
from ..db import Pool
from ..errors import MfWorkerError, PluginLoadError, describe_error
from ..logs import get_logger
from ..plugins import import_target
from ..settings import Settings
from ..smtp import parse_smtp_url
from .budget import Trip
from .mail import EmailNotifier, database_contacts, mail_settings


@dataclass(frozen=True, slots=True)
class ProviderPaused:
    """Calls under a limit key are paused fleet-wide because the provider's quota is exhausted
    (sent once per pause, by the worker that started it; items wait, none fails)."""

    limit_key: str
    reason: str
    paused_until: datetime
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "provider_quota_exhausted", "limit_key": self.limit_key,
                "reason": self.reason, "paused_until": self.paused_until.isoformat(),
                "error": self.error}


@runtime_checkable
class Notifier(Protocol):
    async def notify(self, trip: Trip) -> None:
        """Deliver one trip; raise to signal failure (the caller logs it)."""


async def notify_provider_paused(notifier: object, event: ProviderPaused) -> None:
    """Deliver a provider pause through ``notifier``'s optional ``notify_provider(event)``;
    a notifier without it (an older plugin) gets the log line instead."""
    method = getattr(notifier, "notify_provider", None)
    if method is None:
        await LogNotifier().notify_provider(event)
    else:
        await method(event)


class LogNotifier:
    """Writes the trip as a warning log line (always available, needs nothing)."""

    async def notify(self, trip: Trip) -> None:
        fields = {k: v for k, v in trip.to_json().items() if k != "event"}
        get_logger("mf_worker.notify").warning("cost_limit_reached", **fields)

    async def notify_provider(self, event: ProviderPaused) -> None:
        fields = {k: v for k, v in event.to_json().items() if k != "event"}
        get_logger("mf_worker.notify").error("provider_quota_exhausted", **fields)


class WebhookError(MfWorkerError):
    """The webhook did not accept the notification (status or connection error)."""


class PermanentWebhookError(WebhookError):
    """A 4xx answer: retrying will not help."""


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, WebhookError) and not isinstance(exc, PermanentWebhookError)


class WebhookNotifier:
    """POSTs the trip as JSON; retries 5xx, 429 and connection errors a few times."""

    def __init__(self, url: str, *, timeout: float = 5.0, attempts: int = 4,
                 backoff: float = 0.5) -> None:
        self.url, self.timeout, self.attempts = url, timeout, attempts
        # 0.5, 1, 2 … s between attempts (no jitter: one trip, one sender), at most 10 s.
        self.backoff = Backoff(initial=min(backoff, 10.0), factor=2.0, cap=10.0)

    def _post(self, body: bytes) -> int:
        request = urllib.request.Request(  # noqa: S310 - the operator's own https/http URL
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "mf-worker"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response's socket
            if exc.code >= 500 or exc.code == 429:
                raise WebhookError(f"webhook answered {exc.code}") from None
            raise PermanentWebhookError(f"webhook refused the notification: {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise WebhookError(f"webhook unreachable: {getattr(exc, 'reason', exc)}") from None

    async def notify(self, trip: Trip) -> None:
        await self._send(trip.to_json())

    async def notify_provider(self, event: ProviderPaused) -> None:
        await self._send(event.to_json())

    async def _send(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=self.backoff.wait,
            stop=stop_after_attempt(self.attempts),
            reraise=True,
        ):
            with attempt:
                await asyncio.to_thread(self._post, body)


def load_notifier(spec: str, webhook_url: str | None) -> Notifier:
    """``log``, ``webhook`` (needs MF_NOTIFY_WEBHOOK_URL) or ``module:attr``."""
    if spec == "log":
        return LogNotifier()
    if spec == "webhook":
        if not webhook_url:
            raise PluginLoadError("MF_NOTIFIER=webhook needs MF_NOTIFY_WEBHOOK_URL")
        return WebhookNotifier(webhook_url)
    if ":" not in spec:
        raise PluginLoadError(f"MF_NOTIFIER={spec!r}: expected log, webhook or module:attr")
    module, _, attr = spec.partition(":")
    obj = import_target(spec, spec, kind="notifier")
    notifier = obj() if isinstance(obj, type) else obj
    if not isinstance(notifier, Notifier):
        raise PluginLoadError(f"MF_NOTIFIER={spec!r}: {module}.{attr} has no async notify(trip)")
    return notifier


class NotificationError(MfWorkerError):
    """One or more of the configured notifiers failed (each named with its error)."""


class MultiNotifier:
    """Several notifiers in turn. One that already delivered a trip is not asked again when
    the trip is retried by this process (a restart may repeat it: at least once)."""

    def __init__(self, notifiers: list[tuple[str, Notifier]]) -> None:
        self.notifiers = notifiers
        self._delivered: set[tuple[str, str, date]] = set()

    async def notify(self, trip: Trip) -> None:
        # Only the current days matter: forget what was delivered for older ones.
        self._delivered = {k for k in self._delivered if k[2] >= trip.date}
        failures: list[str] = []
        for name, notifier in self.notifiers:
            key = (name, trip.organization_id, trip.date)
            if key in self._delivered:
                continue
            try:
                await notifier.notify(trip)
            except Exception as exc:
                failures.append(f"{name}: {describe_error(exc)}")
                continue
            self._delivered.add(key)
        if failures:
            raise NotificationError("; ".join(failures))

    async def notify_provider(self, event: ProviderPaused) -> None:
        failures: list[str] = []
        for name, notifier in self.notifiers:
            try:
                await notify_provider_paused(notifier, event)
            except Exception as exc:
                failures.append(f"{name}: {describe_error(exc)}")
        if failures:
            raise NotificationError("; ".join(failures))


def build_notifier(settings: Settings, pool: Pool | None) -> Notifier:
    """The notifier ``MF_NOTIFIER`` names (several: a :class:`MultiNotifier`), each checked now
    so a missing setting stops start-up. ``pool`` serves the email notifier's look-ups."""
    built: list[tuple[str, Notifier]] = []
    for name in settings.notifiers:
        if name == "email":
            if settings.smtp_url is None:
                raise PluginLoadError("MF_NOTIFIER=email needs MF_SMTP_URL (smtp:// or smtps://)")
            if settings.mail_from is None:
                raise PluginLoadError("MF_NOTIFIER=email needs MF_MAIL_FROM (the sender)")
            built.append((name, EmailNotifier(
                parse_smtp_url(settings.smtp_url.reveal()), settings.mail_from,
                database_contacts(pool, mail_settings(settings)), mail_to=settings.mail_to,
                policy=settings.cost_limit_policy,
            )))
        else:
            webhook = settings.notify_webhook_url.reveal() if settings.notify_webhook_url else None
            built.append((name, load_notifier(name, webhook)))
    return built[0][1] if len(built) == 1 else MultiNotifier(built)
