"""The scheduler loop: a planning pass every ``MF_SCHEDULER_INTERVAL``, paced across the fleet.

The planning itself — the fleet's lock, the change log, the sweep, the cadence rule — is
``scheduling.scheduler.run_pass``. This loop decides when to run it: the daemon's passes are
paced (skipped when any replica ran one within 0.9 of the interval, on the database's clock, so
a fleet of any size plans once per interval), and it reports what the passes found: a log line
per project whose cadence or zone became invalid (once per error), and on the event hub a
:class:`~mf_worker.engine.events.ProjectInvalid` per invalid project and a
:class:`~mf_worker.engine.events.SchedulerPassed` per pass that ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..db import Pool
from ..engine.events import EventHub, ProjectInvalid, SchedulerPassed
from ..scheduling.scheduler import BATCH_SIZE, PassOptions, SchedulerResult, run_pass
from .loop import PeriodicLoop, check_positive

# A paced pass runs when the last one (any replica's) started at least this share of the
# interval ago: replicas' loops drift, and a strict "one interval" would skip one pass in two.
PACING_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """When the scheduler plans, and how."""

    # Seconds between the daemon's passes (MF_SCHEDULER_INTERVAL), fleet-wide.
    interval: float = 60.0
    # Seconds before its delivery instant an item becomes claimable (MF_LEAD_SECONDS).
    lead_seconds: float = 0.0
    # Seconds between full sweeps of every project (MF_SCHEDULER_SWEEP_INTERVAL).
    sweep_interval: float = 3600.0
    # Projects (or items) handled per statement and per change-log transaction.
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        check_positive("scheduler", interval=self.interval)
        self.options  # noqa: B018 - validates the planning knobs now, not at the first pass

    @property
    def options(self) -> PassOptions:
        return PassOptions(lead_seconds=self.lead_seconds, sweep_interval=self.sweep_interval,
                           batch_size=self.batch_size)


class Scheduler(PeriodicLoop[SchedulerResult]):
    """The scheduler loop (runs inside ``mf-worker run``; ``mf-worker schedule`` runs one pass)."""

    name = "scheduler"

    def __init__(
        self,
        pool: Pool,
        config: SchedulerConfig | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        events: EventHub | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        super().__init__(self.config.interval)
        self._pool = pool
        self._options = self.config.options
        self._clock = clock
        self._events = events or EventHub()
        self._reported: dict[str, str] = {}
        # Projects known to be invalid, as of the last pass that looked at them (a sweep looks
        # at all): what the invalid-projects gauge reports.
        self._invalid: dict[str, str] = {}

    async def tick(self) -> SchedulerResult:
        """The daemon's pass: skipped when any replica ran one within the interval."""
        return await self.run_once(paced=True)

    async def run_once(
        self, now: datetime | None = None, *, paced: bool = False, sweep: bool | None = None,
        wait: bool = False,
    ) -> SchedulerResult:
        """One pass at ``now`` (None: the loop's clock), unless another replica holds the
        fleet's lock (``skipped``; with ``wait``, after that replica's pass ends).

        ``paced``: also skip when a pass ran within the interval. ``sweep``: True forces a full
        sweep, False forbids one; None sweeps when the last sweep is older than the sweep
        interval (or in the future of ``now``).
        """
        result = await run_pass(
            self._pool, now or self._clock(), self._options,
            min_gap_seconds=self.interval * PACING_SHARE if paced else None,
            sweep=sweep, wait=wait)
        if not result.skipped:
            self._report(result)
        return result

    def _report(self, result: SchedulerResult) -> None:
        if result.swept:
            self._invalid = dict(result.invalid)
        else:
            for project_id in result.changed:
                self._invalid.pop(project_id, None)
            self._invalid.update(result.invalid)
        for project_id, error in result.invalid.items():
            if self._reported.get(project_id) != error:
                self._log.warning("project_schedule_invalid", project_id=project_id, error=error)
                self._reported[project_id] = error
            self._events.publish(ProjectInvalid(project_id, error))
        self._events.publish(SchedulerPassed(result.created, len(self._invalid)))
        if result.created or result.rescheduled or result.cancelled:
            self._log.info(
                "scheduler_pass",
                created=result.created,
                rescheduled=result.rescheduled,
                cancelled=result.cancelled,
                invalid=len(result.invalid),
                examined=result.examined,
                swept=result.swept,
            )
