"""The event hub: the engine and the maintenance loops publish what happened; metrics, logs and
the systemd watchdog subscribe.

One mechanism instead of a callback style per producer (observers, listener lists, ``on_…``
arguments), the way Oban's telemetry works: a producer calls :meth:`EventHub.publish` with a
typed event and knows nothing of who listens; a subscriber registers for an event *type*
(subclasses included) with :meth:`EventHub.subscribe`. Delivery is synchronous, in the order
of subscription, on the publisher's task: handlers must be quick and must not block (they
count, log, or set a flag).

A handler that raises is logged (``event_handler_failed``) and the others still run: a bug in
a metric must not fail an item or a maintenance pass.

The events: the worker's :class:`~mf_worker.engine.worker.AttemptReport` (one per attempt),
:class:`ItemsClaimed`, :class:`ClaimLoopTicked`, :class:`TripNotified`; flow control's
``FlowEvent``; the reaper's ``queue.ReapedItem``; the publisher's ``Publication`` and
``Withdrawal``; the scheduler's :class:`SchedulerPassed` and :class:`ProjectInvalid`. Each
producer's own result types are published as they are, so an event is what the producer
already returns from ``run_once``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import describe_error
from ..logs import get_logger
from ..queue import ClaimedItem

__all__ = [
    "ClaimLoopTicked", "EventHub", "ItemMovedToFallback", "ItemsClaimed", "ProjectInvalid",
    "SchedulerPassed", "TripNotified",
]

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class ItemsClaimed:
    """One claim took these items, at ``claimed_at`` (Unix time)."""

    items: Sequence[ClaimedItem]
    claimed_at: float


@dataclass(frozen=True, slots=True)
class ItemMovedToFallback:
    """An item due soon went to the fallback generator: ``reason`` is ``rate_limited`` or
    ``quota_exhausted`` (the generator's key is held) or ``transient`` (its calls failing)."""

    item: ClaimedItem
    reason: str
    due_in_seconds: float


@dataclass(frozen=True, slots=True)
class ClaimLoopTicked:
    """The claim loop went round (it is alive) with ``in_flight`` items held."""

    in_flight: int


@dataclass(frozen=True, slots=True)
class TripNotified:
    """A cost-limit trip's notifiers were tried: ``delivered`` by all of them, or not."""

    delivered: bool


@dataclass(frozen=True, slots=True)
class SchedulerPassed:
    """A scheduler pass ran (not skipped): items created, and projects known to be invalid."""

    created: int
    invalid_projects: int


@dataclass(frozen=True, slots=True)
class ProjectInvalid:
    """A pass found a project whose cadence or zone cannot be planned (every pass that finds
    it says so; the log line only when its error changes)."""

    project_id: str
    error: str


class EventHub:
    """Typed publish/subscribe within one daemon (tests build their own)."""

    def __init__(self) -> None:
        self._handlers: dict[type, list[Callable[[Any], None]]] = {}
        self._log = get_logger("mf_worker.events")

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> None:
        """Call ``handler`` with every published event that is a ``kind``."""
        self._handlers.setdefault(kind, []).append(handler)

    def publish(self, event: object) -> None:
        """Deliver ``event`` to the handlers of its type and of its base types."""
        for kind in type(event).__mro__:
            for handler in self._handlers.get(kind, ()):
                try:
                    handler(event)
                except Exception as exc:  # a subscriber's bug must not fail the producer
                    self._log.error("event_handler_failed", event_type=type(event).__name__,
                                    error=describe_error(exc))
