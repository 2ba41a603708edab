"""When is a project's next episode due: cadence rules turned into UTC instants.

The web app stores a project's cadence as jsonb, its delivery time as a wall-clock time and the
owner's IANA zone; the scheduler needs one UTC instant to put on the queue. Everything here is
pure (no clock, no database) so the scheduler can call it for every project on every pass and the
tests can check it against an independent oracle.

Day numbers are JavaScript's (0 = Sunday … 6 = Saturday) because that is what the web app writes;
Python's ``weekday()`` counts from Monday, so every comparison goes through ``_js_day``.

Daylight-saving policy, chosen so an owner never gets two episodes, or none, on one day:

* a delivery time inside a spring-forward gap is delivered at the transition instant (the first
  valid instant after it), not an hour later as a naive offset calculation would give;
* a delivery time that occurs twice in a fall-back overlap is delivered at its first occurrence
  only; an ``after`` between the two readings moves on to the next allowed day;
* a date the zone skipped entirely (Pacific/Apia 2011-12-30) has no delivery, and neither has a
  time whose gap runs past the end of its date, so a delivery always lands on its own local date.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from typing import Final

import pendulum

from mf_worker.errors import InvalidItemError

__all__ = ["Cadence", "CadenceError", "next_occurrence", "parse_cadence"]

MODES: Final = ("daily", "weekdays", "weekly", "custom")
_ALL_DAYS: Final = frozenset(range(7))
_MONDAY_TO_FRIDAY: Final = frozenset(range(1, 6))
_MONDAY: Final = 1
# Enough candidate dates for a weekly cadence even if `after` falls just past this week's
# delivery and the zone skips a date; the loop normally stops within one or two dates.
_SEARCH_DAYS: Final = 32
_ONE_SECOND: Final = timedelta(seconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class CadenceError(ValueError, InvalidItemError):
    """A project's scheduling data is unusable.

    A ``ValueError`` for callers that just validate input, an ``InvalidItemError`` so the
    scheduler treats it like any other broken queue item. ``field`` names the offending input;
    the message does not name the project, which only the scheduler knows and adds itself.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[CadenceError], tuple[str, str]]:
        # Exceptions pickle by their args; ours takes two, so say so (multiprocessing, logging).
        return (type(self), (self.field, self.problem))


@dataclass(frozen=True, slots=True)
class Cadence:
    """A validated cadence; ``days`` keeps the stored order because weekly reads the first one."""

    mode: str
    days: tuple[int, ...]

    def allowed_js_days(self) -> frozenset[int]:
        """The JavaScript day numbers (0 = Sunday) on which this cadence delivers."""
        if self.mode == "daily":
            return _ALL_DAYS
        if self.mode == "weekdays":
            return _MONDAY_TO_FRIDAY
        if self.mode == "weekly":
            # The web app lets the owner reorder days; the first listed one is the weekly day.
            return frozenset(self.days[:1] or (_MONDAY,))
        return frozenset(self.days)


def parse_cadence(config: object) -> Cadence:
    """Validate a stored ``cadence_config``; unknown keys are ignored so the web app can add some.

    ``days`` is checked in every mode, even those that ignore it, so bad data surfaces the first
    time it is stored rather than the day the owner switches to weekly.
    """
    if not isinstance(config, Mapping):
        raise CadenceError("cadence_config", f"expected a JSON object, got {_describe(config)}")
    mode = config.get("mode")
    if not isinstance(mode, str) or mode not in MODES:
        raise CadenceError(
            "cadence_config.mode",
            f"unknown mode {reprlib.repr(mode)} (expected daily, weekdays, weekly or custom)",
        )
    raw_days = config.get("days")
    if raw_days is None:
        raw_days = []
    if not isinstance(raw_days, list | tuple):
        raise CadenceError(
            "cadence_config.days", f"expected a list of day numbers, got {_describe(raw_days)}"
        )
    for index, day in enumerate(raw_days):
        # bool is an int subclass, but `true` in the jsonb is a bug upstream, not Monday.
        if isinstance(day, bool) or not isinstance(day, int) or not 0 <= day <= 6:
            raise CadenceError(
                f"cadence_config.days[{index}]",
                f"{reprlib.repr(day)} is not a day number 0-6 (0 = Sunday)",
            )
    if mode == "custom" and not raw_days:
        raise CadenceError("cadence_config.days", "custom mode needs at least one day, got none")
    return Cadence(mode=mode, days=tuple(raw_days))


def next_occurrence(
    cadence_config: Mapping[str, object],
    delivery_time: time,
    timezone: str,
    after: datetime,
) -> datetime:
    """The first delivery instant strictly after ``after``, in UTC.

    Strictly after, so feeding back the previous result yields the following delivery rather
    than the same one. See the module docstring for the daylight-saving policy.
    """
    allowed = parse_cadence(cadence_config).allowed_js_days()
    if not isinstance(delivery_time, time):
        raise CadenceError(
            "delivery_time", f"expected a datetime.time, got {_describe(delivery_time)}"
        )
    if delivery_time.tzinfo is not None:
        # A fixed offset would defeat the owner's zone and its daylight-saving rules.
        raise CadenceError(
            "delivery_time", f"must be a naive wall-clock time, got aware {delivery_time}"
        )
    if not isinstance(timezone, str):
        raise CadenceError("timezone", f"expected an IANA zone name, got {_describe(timezone)}")
    zone = _zone(timezone)
    if not isinstance(after, datetime):
        raise CadenceError("after", f"expected a datetime, got {_describe(after)}")
    if after.utcoffset() is None:
        raise CadenceError("after", f"must be timezone-aware, got naive {after.isoformat()}")

    start = after.astimezone(zone).date() - timedelta(days=1)
    for offset in range(_SEARCH_DAYS):
        day = start + timedelta(days=offset)
        if _js_day(day) not in allowed:
            continue
        instant = _delivery_instant(day, delivery_time, zone)
        if instant is not None and instant > after:
            return instant
    raise CadenceError(  # pragma: no cover - every valid cadence delivers at least weekly
        "timezone", f"no delivery within {_SEARCH_DAYS} days of {after.isoformat()} in {timezone}"
    )


def _js_day(day: date) -> int:
    """JavaScript's getDay() numbering: Python's Monday = 0 becomes 1, Sunday = 6 becomes 0."""
    return (day.weekday() + 1) % 7


@lru_cache(maxsize=1024)
def _zone(name: str) -> tzinfo:
    """Look a zone up once per name: the scheduler asks for the same few hundred all the time."""
    # "localtime" loads from most TZPATHs but means the worker host's zone, never the owner's.
    if not name or name == "localtime":
        raise CadenceError("timezone", f"unknown IANA time zone {reprlib.repr(name)}")
    try:
        return pendulum.timezone(name)
    except (ValueError, OSError) as exc:  # InvalidTimezone is a ValueError; so are bad paths.
        raise CadenceError("timezone", f"unknown IANA time zone {reprlib.repr(name)}") from exc


def _delivery_instant(day: date, wall: time, zone: tzinfo) -> datetime | None:
    """The UTC instant of ``wall`` on local ``day`` under the DST policy, None if skipped.

    Instead of pendulum's gap/overlap defaults this relies on PEP 495 folds: fold=0 reads an
    ambiguous or missing wall time with the offset in force before the transition, fold=1
    with the one after. Equal offsets (nearly always) mean an ordinary time; a larger
    pre-transition offset means an overlap, whose first reading is fold=0; a smaller one
    means a gap.
    """
    first = datetime.combine(day, wall, tzinfo=zone)
    second = first.replace(fold=1)
    old, new = first.utcoffset(), second.utcoffset()
    assert old is not None and new is not None  # a ZoneInfo always has an offset
    if old >= new:
        return first.astimezone(UTC)
    transition = _transition_between(second.astimezone(UTC), first.astimezone(UTC), zone)
    if transition.astimezone(zone).date() != day:
        return None  # the gap swallows the rest of the date, or the whole date
    return transition


def _transition_between(low: datetime, high: datetime, zone: tzinfo) -> datetime:
    """The first instant in (low, high] whose offset differs from low's, by bisection.

    Zone files store transitions in whole seconds, so bisecting epoch seconds is exact and
    takes about 12 steps for a one-hour gap, 17 for a skipped day; gaps are rare enough.
    """
    lo = (low - _EPOCH) // _ONE_SECOND
    hi = (high - _EPOCH) // _ONE_SECOND
    old_offset = datetime.fromtimestamp(lo, zone).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == old_offset:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def _describe(value: object) -> str:
    """Type and (shortened) value, so an error names what was actually stored."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def zone_for(name: str) -> tzinfo:
    """The zone for an IANA name (cached), or a CadenceError naming ``timezone``."""
    return _zone(name)
