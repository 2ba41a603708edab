"""The budget loop: releases cost-blocked items and re-sends trip notifications that failed.

Runs beside the scheduler, at its interval. Each pass first sends again the day's trips whose
notification failed or was interrupted (notifications are at least once), then releases the
blocked items: at the next UTC day by policy (``resume`` or ``skip``), or the same day once the
worst case the trip refused fits (the limit was raised). The rules and their SQL are
``cost.budget``'s; this module is the loop around them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from ..cost.budget import POLICIES, TripNotifier, release_blocked_items, resend_notifications
from ..db import Pool
from ..engine.events import EventHub, TripNotified
from .loop import PeriodicLoop, check_positive


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """What a pass releases, and when."""

    # What happens to blocked items when the UTC day turns (MF_COST_LIMIT_POLICY): ``resume``
    # them, or ``skip`` the day's episodes.
    policy: str
    # The daily limit of organisations without their own (MF_DAILY_COST_LIMIT_GBP).
    default_limit: Decimal
    # The worst case assumed for an item whose trip did not record one (MF_COST_RESERVE_GBP).
    reserve_per_item: Decimal
    # Seconds between passes (MF_SCHEDULER_INTERVAL: it runs beside the scheduler).
    interval: float = 60.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(
                f"cost limit policy must be one of {POLICIES}, not {self.policy!r}")
        check_positive("budget", interval=self.interval)


@dataclass
class BudgetResult:
    """What one pass did."""

    resumed: int = 0
    skipped: int = 0
    notified: int = 0


class BudgetLoop(PeriodicLoop[BudgetResult]):
    """Releases cost-blocked items and re-sends failed notifications; each notification it
    tries is published as a :class:`~mf_worker.engine.events.TripNotified`."""

    name = "budget"

    def __init__(
        self, pool: Pool, config: BudgetConfig, *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        notifier: TripNotifier | None = None, events: EventHub | None = None,
    ) -> None:
        self.config = config
        super().__init__(config.interval)
        self._pool, self._clock, self._notifier = pool, clock, notifier
        self._events = events or EventHub()

    async def run_once(self, now: datetime | None = None) -> BudgetResult:
        """One pass at ``now`` (None: the loop's clock; the UTC day is taken from it)."""
        now = now or self._clock()
        result = BudgetResult()
        if self._notifier is not None:
            result.notified = await resend_notifications(
                self._pool, self._notifier, now=now, on_notified=self._notified)
        released = await release_blocked_items(
            self._pool, now=now, policy=self.config.policy,
            default_limit=self.config.default_limit,
            reserve_per_item=self.config.reserve_per_item)
        result.resumed, result.skipped = released.resumed, released.skipped
        return result

    def _notified(self, delivered: bool) -> None:
        self._events.publish(TripNotified(delivered))
