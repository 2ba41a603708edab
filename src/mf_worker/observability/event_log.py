"""The log lines of what the worker and the maintenance loops report on the event hub.

The log is one more subscriber, like the metrics and the watchdog: a producer publishes what
happened (an attempt's outcome, a reaped item, a withdrawn episode) and this module says it in
the log, under the stable event names operators grep for (``item_completed``, ``lease_lost``,
``item_cancelled``, ``item_reaped``, ``episode_withdrawn``). The hub delivers on the
publisher's task, so a line carries the item context the publisher bound (``bind_item``: queue
id, project, organisation, attempt). Each line keeps the logger name of the part that did the
work (``mf_worker.worker``, ``mf_worker.reaper``, ``mf_worker.publisher``).

What a loop says about itself (a pass that failed, a listener that reconnected) stays in the
loop: that is its own state, not an event.
"""

from __future__ import annotations

from typing import Any

from ..engine.events import EventHub
from ..engine.worker import AttemptReport, Outcome
from ..logs import bind_item, get_logger
from ..maintenance.publisher import Withdrawal
from ..queue import ReapedItem

__all__ = ["EventLog"]


class EventLog:
    """Subscribes the log lines to a hub (one per daemon)."""

    def __init__(self) -> None:
        self._worker = get_logger("mf_worker.worker")
        self._reaper = get_logger("mf_worker.reaper")
        self._publisher = get_logger("mf_worker.publisher")

    def subscribe(self, events: EventHub) -> None:
        events.subscribe(AttemptReport, self.on_attempt)
        events.subscribe(ReapedItem, self.on_reaped)
        events.subscribe(Withdrawal, self.on_withdrawn)

    def on_attempt(self, report: AttemptReport) -> None:
        """An attempt ended well or was taken away; failures and deferrals are logged where
        they are classified, with their reason (the worker's ``attempt_failed``)."""
        fields: dict[str, Any] = {"outcome": report.outcome.value,
                                  "seconds": round(report.item_seconds, 4)}
        if report.outcome is Outcome.SUCCESS:
            # Which generator wrote it (``fallback`` during a provider outage) and its model.
            fields["generator"] = report.role.value
            if report.result is not None and report.result.usages:
                fields["model"] = report.result.usages[0].model
            if report.delivery is not None and report.delivery.withdrawn_reason is not None:
                # Its project was paused or archived while it was generated.
                fields["withdrawn"] = report.delivery.withdrawn_reason
            elif report.delivery is not None and report.delivery.published_at is None:
                # Finished in the lead window: the publisher makes it visible at its instant.
                fields["publishes_at"] = report.delivery.scheduled_for.isoformat()
            self._worker.info("item_completed", **fields)
        elif report.outcome is Outcome.LEASE_LOST:
            self._worker.warning("lease_lost", error=report.error, **fields)
        elif report.outcome is Outcome.CANCELLED:
            self._worker.info("item_cancelled", reason=report.error, **fields)

    def on_reaped(self, item: ReapedItem) -> None:
        with bind_item(queue_id=item.id, organization_id=item.organization_id,
                       attempt=item.attempt):
            self._reaper.warning("item_reaped", status=item.status, error=item.error)

    def on_withdrawn(self, withdrawal: Withdrawal) -> None:
        with bind_item(queue_id=withdrawal.queue_id,
                       organization_id=withdrawal.organization_id):
            self._publisher.info("episode_withdrawn", episode_id=withdrawal.episode_id,
                                 reason=withdrawal.reason)
