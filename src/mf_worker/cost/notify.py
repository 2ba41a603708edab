"""Telling the operator that an organisation hit its daily cost limit: the notifier plugins.

``log`` (the default) writes a warning line; ``webhook`` POSTs the trip as JSON to
``MF_NOTIFY_WEBHOOK_URL`` with a timeout and retries (tenacity), using only the standard
library in a thread. A third-party notifier is any object with ``async notify(trip)``, loaded
by ``module:attr``. A notifier that keeps failing is logged, never fatal: the items are blocked
either way.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Protocol, runtime_checkable

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import MfWorkerError, PluginLoadError
from ..generation.loader import import_target
from ..logs import get_logger
from .budget import Trip


@runtime_checkable
class Notifier(Protocol):
    async def notify(self, trip: Trip) -> None:
        """Deliver one trip; raise to signal failure (the caller logs it)."""


class LogNotifier:
    """Writes the trip as a warning log line (always available, needs nothing)."""

    async def notify(self, trip: Trip) -> None:
        fields = {k: v for k, v in trip.to_json().items() if k != "event"}
        get_logger("mf_worker.notify").warning("cost_limit_reached", **fields)


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
        self.url, self.timeout, self.attempts, self.backoff = url, timeout, attempts, backoff

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
        body = json.dumps(trip.to_json()).encode()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential(multiplier=self.backoff, max=10),
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
