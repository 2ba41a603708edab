"""Tests for mf_worker.scheduling.cadence: cadence rules, JS day numbering and the DST policy.

The property tests compare `next_occurrence` with an oracle written here from scratch with
zoneinfo (scanning for gap transitions rather than bisecting on offsets), so a shared mistake
in the two would have to be made twice, in two different ways.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import pendulum
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from mf_worker.errors import InvalidItemError
from mf_worker.scheduling import Cadence, CadenceError, next_occurrence, parse_cadence

# "localtime" is the host's zone file, deliberately refused by the code under test.
ZONES = sorted(available_timezones() - {"localtime"})
MODES = ["daily", "weekdays", "weekly", "custom"]
ONE_MICROSECOND = timedelta(microseconds=1)
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- the oracle


def js_day(day: date) -> int:
    """strftime's %w is exactly JavaScript's getDay(): 0 = Sunday … 6 = Saturday."""
    return int(day.strftime("%w"))


def expected_days(config: dict[str, Any]) -> set[int]:
    days = list(config.get("days") or [])
    mode = config["mode"]
    if mode == "daily":
        return {0, 1, 2, 3, 4, 5, 6}
    if mode == "weekdays":
        return {1, 2, 3, 4, 5}
    if mode == "weekly":
        return {days[0]} if days else {1}
    return set(days)


def wall_of(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def readings(wall: datetime, zone: ZoneInfo) -> list[datetime]:
    """Every UTC instant whose local wall-clock reading is exactly `wall`."""
    found = set()
    for fold in (0, 1):
        candidate = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if wall_of(candidate, zone) == wall:
            found.add(candidate)
    return sorted(found)


def gap_end(wall: datetime, zone: ZoneInfo) -> datetime:
    """For a wall time that never occurs: the first instant whose reading is past it.

    Walks forward from an instant reading earlier than `wall`, a minute then a second at a
    time (zone files hold whole-second transitions), instead of bisecting like the code does.
    """
    instant = wall.replace(tzinfo=zone, fold=1).astimezone(UTC).replace(microsecond=0)
    assert wall_of(instant, zone) < wall
    while wall_of(instant + timedelta(minutes=1), zone) <= wall:
        instant += timedelta(minutes=1)
    while wall_of(instant, zone) <= wall:
        instant += timedelta(seconds=1)
    return instant


def oracle(day: date, delivery: time, zone: ZoneInfo) -> datetime | None:
    """Where the delivery of local date `day` is, or None if that date has none."""
    wall = datetime.combine(day, delivery)
    found = readings(wall, zone)
    if found:
        return found[0]
    transition = gap_end(wall, zone)
    return transition if transition.astimezone(zone).date() == day else None


def dates(first: date, last: date) -> Iterator[date]:
    while first <= last:
        yield first
        first += timedelta(days=1)


def next_transition(zone: ZoneInfo, start: datetime) -> datetime | None:
    """The first offset change after `start` within ~400 days (only used to pick inputs)."""
    step = 6 * 3600
    probe = int(start.timestamp())
    offset = datetime.fromtimestamp(probe, zone).utcoffset()
    for _ in range(1600):
        if datetime.fromtimestamp(probe + step, zone).utcoffset() != offset:
            lo, hi = probe, probe + step
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if datetime.fromtimestamp(mid, zone).utcoffset() == offset:
                    lo = mid
                else:
                    hi = mid
            return datetime.fromtimestamp(hi, UTC)
        probe += step
    return None


def _changes_offset(name: str) -> bool:
    zone = ZoneInfo(name)
    offsets = {
        datetime(2026, month, 1, tzinfo=UTC).astimezone(zone).utcoffset() for month in (1, 7)
    }
    return len(offsets) > 1


DST_ZONES = [name for name in ZONES if _changes_offset(name)]


# --------------------------------------------------------------------------- strategies


@st.composite
def cadences(draw: st.DrawFn) -> dict[str, Any]:
    mode = draw(st.sampled_from(MODES))
    days = draw(st.lists(st.integers(0, 6), min_size=1 if mode == "custom" else 0, max_size=10))
    config: dict[str, Any] = {"mode": mode, "days": days}
    if not days and draw(st.booleans()):
        config["days"] = draw(st.sampled_from([None, "missing"]))
        if config["days"] == "missing":
            del config["days"]
    if draw(st.booleans()):
        config["colour"] = "ignored"  # unknown keys are ignored
    return config


afters = st.datetimes(
    min_value=datetime(2020, 1, 1),
    max_value=datetime(2035, 12, 31, 23, 59, 59),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))])
    | st.sampled_from(ZONES).map(ZoneInfo),
)


@st.composite
def near_transitions(draw: st.DrawFn) -> tuple[dict[str, Any], str, time, datetime]:
    """A DST zone, a delivery time in or next to a transition's gap or overlap, a cadence that
    delivers on that date and an `after` shortly before it, so the interesting cases come up
    often rather than once in a thousand draws."""
    name = draw(st.sampled_from(DST_ZONES))
    zone = ZoneInfo(name)
    start = datetime(draw(st.integers(2020, 2034)), 1, 1, tzinfo=UTC) + draw(
        st.timedeltas(timedelta(0), timedelta(days=365))
    )
    transition = next_transition(zone, start)
    assume(transition is not None)  # e.g. Africa/Cairo had no DST in 2020-2022
    assert transition is not None
    before = (transition - timedelta(seconds=1)).astimezone(zone).utcoffset()
    after_ = transition.astimezone(zone).utcoffset()
    assert before is not None and after_ is not None
    # The wall clock reads `old_wall` just before the transition and `new_wall` at it: the
    # gap or overlap lies between the two. Aim there, give or take five minutes.
    new_wall = transition.astimezone(zone).replace(tzinfo=None)
    old_wall = new_wall - (after_ - before)
    margin = timedelta(minutes=5)
    span = abs(after_ - before) + 2 * margin
    wall = min(old_wall, new_wall) - margin + draw(st.timedeltas(timedelta(0), span))
    config = draw(cadences())
    day = js_day(wall.date())
    if config["mode"] == "weekly":
        config["days"] = [day, *(config.get("days") or [])]
    elif config["mode"] == "custom":
        config["days"] = [*config["days"], day]
    # From 20 hours before (past the previous day's delivery) to shortly after the transition;
    # counted from the far end so hypothesis's favourite value, zero, is not the transition.
    after = (
        transition
        - timedelta(hours=20)
        + draw(st.timedeltas(timedelta(0), timedelta(hours=20, minutes=30)))
    )
    return config, name, wall.time(), after


# --------------------------------------------------------------------------- properties


def check_properties(config: dict[str, Any], name: str, delivery: time, after: datetime) -> None:
    zone = ZoneInfo(name)
    allowed = expected_days(config)
    result = next_occurrence(config, delivery, name, after)

    assert result > after, "strictly after `after`"
    assert type(result) is datetime and result.tzinfo is UTC, "a plain UTC-aware datetime"
    local = result.astimezone(zone)
    assert js_day(local.date()) in allowed, "lands on an allowed weekday (0 = Sunday)"

    wall = datetime.combine(local.date(), delivery)
    if local.replace(tzinfo=None) == wall:
        both = readings(wall, zone)
        event("overlap: first reading" if len(both) == 2 else "ordinary time")
        assert result == both[0], "an ambiguous time uses its first reading"
    else:
        event("gap: moved to the transition")
        assert readings(wall, zone) == [], "only a non-existent wall time may move"
        just_before = result - ONE_MICROSECOND
        assert just_before.astimezone(zone).utcoffset() != local.utcoffset(), "at a transition"
        assert wall_of(just_before, zone) < wall < local.replace(tzinfo=None), "across the gap"

    first_date = after.astimezone(zone).date() - timedelta(days=2)
    for day in dates(first_date, local.date()):
        if js_day(day) not in allowed:
            continue
        candidate = oracle(day, delivery, zone)
        assert candidate is None or not after < candidate < result, f"skipped {day}"
    assert oracle(local.date(), delivery, zone) == result, "agrees with the oracle"


@PROPERTY_SETTINGS
@given(config=cadences(), delivery=st.times(), name=st.sampled_from(ZONES), after=afters)
def test_random_zone_cadence_and_instant_gives_the_next_valid_delivery(
    config: dict[str, Any], delivery: time, name: str, after: datetime
) -> None:
    """Any IANA zone, cadence, delivery time and instant in 2020–2035: strictly after, UTC,
    an allowed local weekday, the delivery wall time (or the end of its gap), nothing skipped."""
    check_properties(config, name, delivery, after)


@PROPERTY_SETTINGS
@given(case=near_transitions())
def test_delivery_times_around_dst_transitions_follow_the_gap_and_overlap_rules(
    case: tuple[dict[str, Any], str, time, datetime],
) -> None:
    """Same properties with the delivery time in or next to a gap or overlap and `after`
    close to the transition, where random sampling alone would rarely look."""
    check_properties(*case)


# --------------------------------------------------------------------------- named cases

DAILY = {"mode": "daily"}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def local_in(result: datetime, name: str) -> datetime:
    return result.astimezone(ZoneInfo(name))


@pytest.mark.parametrize(
    ("name", "delivery", "after", "expected"),
    [
        # London springs forward at 01:00 UTC: 01:00 GMT becomes 02:00 BST.
        ("Europe/London", time(1, 30), utc(2025, 3, 29, 12), utc(2025, 3, 30, 1)),
        # New York springs forward at 07:00 UTC: 02:00 EST becomes 03:00 EDT.
        ("America/New_York", time(2, 30), utc(2025, 3, 8, 12), utc(2025, 3, 9, 7)),
        # Lord Howe springs forward by 30 minutes: 02:00 +10:30 becomes 02:30 +11.
        ("Australia/Lord_Howe", time(2, 15), utc(2025, 10, 4), utc(2025, 10, 4, 15, 30)),
    ],
)
def test_time_in_spring_gap_is_delivered_at_the_transition_instant(
    name: str, delivery: time, after: datetime, expected: datetime
) -> None:
    result = next_occurrence(DAILY, delivery, name, after)
    assert result == expected
    # The day after, the same wall time exists again and is used as is.
    following = local_in(next_occurrence(DAILY, delivery, name, result), name)
    assert following.time() == delivery
    assert following.date() == local_in(result, name).date() + timedelta(days=1)


@pytest.mark.parametrize(
    ("name", "delivery", "first", "second", "next_day"),
    [
        # London 01:30 happens at 00:30 UTC (BST) and again at 01:30 UTC (GMT).
        (
            "Europe/London",
            time(1, 30),
            utc(2025, 10, 26, 0, 30),
            utc(2025, 10, 26, 1, 30),
            utc(2025, 10, 27, 1, 30),
        ),
        # New York 01:30 happens at 05:30 UTC (EDT) and again at 06:30 UTC (EST).
        (
            "America/New_York",
            time(1, 30),
            utc(2025, 11, 2, 5, 30),
            utc(2025, 11, 2, 6, 30),
            utc(2025, 11, 3, 6, 30),
        ),
        # Lord Howe 01:45 happens at +11 and again 30 minutes later at +10:30.
        (
            "Australia/Lord_Howe",
            time(1, 45),
            utc(2025, 4, 5, 14, 45),
            utc(2025, 4, 5, 15, 15),
            utc(2025, 4, 6, 15, 15),
        ),
    ],
)
def test_time_in_fall_overlap_is_delivered_at_its_first_occurrence_only(
    name: str, delivery: time, first: datetime, second: datetime, next_day: datetime
) -> None:
    assert next_occurrence(DAILY, delivery, name, first - timedelta(hours=12)) == first
    # Between the two readings (and at the second one) the next delivery is the next day.
    assert next_occurrence(DAILY, delivery, name, first) == next_day
    assert next_occurrence(DAILY, delivery, name, first + (second - first) / 2) == next_day
    assert next_occurrence(DAILY, delivery, name, second) == next_day


@pytest.mark.parametrize(
    ("name", "start", "utc_hours"),
    [
        ("Europe/London", utc(2025, 3, 28), [9, 9, 8, 8]),
        ("Europe/London", utc(2025, 10, 24), [8, 8, 9, 9]),
        ("America/New_York", utc(2025, 3, 7), [14, 14, 13, 13]),
        ("America/New_York", utc(2025, 10, 31), [13, 13, 14, 14]),
    ],
)
def test_nine_am_stays_nine_am_local_on_both_sides_of_each_transition(
    name: str, start: datetime, utc_hours: list[int]
) -> None:
    results = []
    after = start
    for _ in utc_hours:
        after = next_occurrence(DAILY, time(9, 0), name, after)
        results.append(after)
    assert [local_in(r, name).time() for r in results] == [time(9, 0)] * len(utc_hours)
    assert [r.hour for r in results] == utc_hours
    days = [local_in(r, name).date() for r in results]
    assert days == [days[0] + timedelta(days=i) for i in range(len(days))], "no day skipped"


@pytest.mark.parametrize("name", ["Asia/Kolkata", "Asia/Tokyo"])
def test_zone_without_dst_delivers_at_the_same_utc_time_all_year(name: str) -> None:
    offset = {"Asia/Kolkata": timedelta(hours=5, minutes=30), "Asia/Tokyo": timedelta(hours=9)}
    for month in range(1, 13):
        result = next_occurrence(DAILY, time(9, 0), name, utc(2025, month, 15, 12))
        assert result == datetime(2025, month, 16, 9, tzinfo=UTC) - offset[name]


def weekdays_of(config: dict[str, Any], count: int, name: str = "Europe/Paris") -> list[int]:
    """JavaScript day numbers of `count` consecutive deliveries, starting Wed 2025-01-01."""
    after = utc(2025, 1, 1)
    found = []
    for _ in range(count):
        after = next_occurrence(config, time(9, 0), name, after)
        found.append(js_day(local_in(after, name).date()))
    return found


def test_sunday_is_day_zero_for_weekly() -> None:
    assert set(weekdays_of({"mode": "weekly", "days": [0]}, 3)) == {0}
    result = next_occurrence(
        {"mode": "weekly", "days": [0]}, time(9), "Europe/Paris", utc(2025, 1, 1)
    )
    assert local_in(result, "Europe/Paris").strftime("%A %Y-%m-%d") == "Sunday 2025-01-05"


def test_sunday_is_day_zero_for_custom_weekend() -> None:
    assert weekdays_of({"mode": "custom", "days": [0, 6]}, 6) == [6, 0, 6, 0, 6, 0]


def test_weekdays_mode_never_delivers_on_saturday_or_sunday() -> None:
    assert weekdays_of({"mode": "weekdays"}, 15) == [3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]


def test_weekdays_mode_ignores_its_days_list() -> None:
    assert weekdays_of({"mode": "weekdays", "days": [0, 6]}, 3) == [3, 4, 5]


def test_daily_delivers_on_every_day_including_sunday() -> None:
    assert weekdays_of({"mode": "daily", "days": [2]}, 7) == [3, 4, 5, 6, 0, 1, 2]


def test_weekly_uses_the_first_listed_day_not_the_smallest() -> None:
    result = next_occurrence({"mode": "weekly", "days": [3, 1]}, time(9), "UTC", utc(2025, 1, 6))
    assert result == utc(2025, 1, 8, 9)
    assert result.strftime("%A") == "Wednesday"


@pytest.mark.parametrize(
    "config", [{"mode": "weekly", "days": []}, {"mode": "weekly"}, {"mode": "weekly", "days": None}]
)
def test_weekly_without_days_delivers_on_monday(config: dict[str, Any]) -> None:
    assert weekdays_of(config, 3) == [1, 1, 1]


def test_duplicate_days_are_harmless() -> None:
    assert weekdays_of({"mode": "custom", "days": [5, 5, 1, 5]}, 4) == [5, 1, 5, 1]


@pytest.mark.parametrize(
    ("name", "after", "expected_local"),
    [
        # Apia jumped from 2011-12-29 24:00 (-10) straight to 2011-12-31 00:00 (+14).
        (
            "Pacific/Apia",
            datetime(2011, 12, 29, 20, tzinfo=ZoneInfo("Pacific/Apia")),
            datetime(2011, 12, 31, 9),
        ),
        # Kwajalein jumped from 1993-08-20 24:00 (-12) straight to 1993-08-22 00:00 (+12).
        (
            "Pacific/Kwajalein",
            datetime(1993, 8, 20, 20, tzinfo=ZoneInfo("Pacific/Kwajalein")),
            datetime(1993, 8, 22, 9),
        ),
    ],
)
def test_date_the_zone_skipped_entirely_has_no_delivery(
    name: str, after: datetime, expected_local: datetime
) -> None:
    result = next_occurrence(DAILY, time(9, 0), name, after)
    assert local_in(result, name).replace(tzinfo=None) == expected_local
    # Not even at midnight: the skipped date's 00:00 is not moved into the next date.
    result = next_occurrence(DAILY, time(0, 0), name, after)
    assert local_in(result, name).replace(tzinfo=None) == expected_local.replace(hour=0)


def test_after_equal_to_a_delivery_instant_returns_the_next_one() -> None:
    first = next_occurrence(DAILY, time(9, 0), "Europe/Berlin", utc(2025, 6, 1))
    assert first == utc(2025, 6, 1, 7)
    assert next_occurrence(DAILY, time(9, 0), "Europe/Berlin", first) == utc(2025, 6, 2, 7)
    just_before = first - ONE_MICROSECOND
    assert next_occurrence(DAILY, time(9, 0), "Europe/Berlin", just_before) == first


def test_seconds_and_microseconds_of_the_delivery_time_are_kept() -> None:
    result = next_occurrence(DAILY, time(9, 0, 7, 123456), "UTC", utc(2025, 6, 1))
    assert result == datetime(2025, 6, 1, 9, 0, 7, 123456, tzinfo=UTC)


def test_pendulum_after_gives_a_plain_stdlib_utc_datetime() -> None:
    result = next_occurrence(DAILY, time(9), "Europe/Rome", pendulum.datetime(2025, 1, 1, tz="UTC"))
    assert type(result) is datetime
    assert result.tzinfo is UTC
    assert result == utc(2025, 1, 1, 8)


def test_parse_cadence_keeps_the_stored_order_and_ignores_unknown_keys() -> None:
    cadence = parse_cadence({"mode": "weekly", "days": [3, 1, 3], "colour": "blue"})
    assert cadence == Cadence(mode="weekly", days=(3, 1, 3))
    assert cadence.allowed_js_days() == frozenset({3})
    with pytest.raises(AttributeError):
        cadence.mode = "daily"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"mode": "daily"}, frozenset(range(7))),
        ({"mode": "weekdays", "days": [0]}, frozenset({1, 2, 3, 4, 5})),
        ({"mode": "weekly", "days": [6, 0]}, frozenset({6})),
        ({"mode": "custom", "days": [0, 6, 0]}, frozenset({0, 6})),
    ],
)
def test_allowed_js_days_follow_each_mode(config: dict[str, Any], expected: frozenset[int]) -> None:
    assert parse_cadence(config).allowed_js_days() == expected


# --------------------------------------------------------------------------- invalid input

GOOD: dict[str, Any] = {
    "cadence_config": {"mode": "daily"},
    "delivery_time": time(9, 0),
    "timezone": "Europe/London",
    "after": utc(2025, 1, 1),
}


@pytest.mark.parametrize(
    ("overrides", "field", "shown"),
    [
        ({"cadence_config": ["daily"]}, "cadence_config", "['daily']"),
        ({"cadence_config": None}, "cadence_config", "None"),
        ({"cadence_config": {"mode": "fortnightly"}}, "cadence_config.mode", "'fortnightly'"),
        ({"cadence_config": {"days": [1]}}, "cadence_config.mode", "None"),
        ({"cadence_config": {"mode": "daily", "days": [1, 2, 7]}}, "cadence_config.days[2]", "7"),
        ({"cadence_config": {"mode": "weekly", "days": [-1]}}, "cadence_config.days[0]", "-1"),
        ({"cadence_config": {"mode": "custom", "days": ["1"]}}, "cadence_config.days[0]", "'1'"),
        ({"cadence_config": {"mode": "custom", "days": [True]}}, "cadence_config.days[0]", "True"),
        ({"cadence_config": {"mode": "daily", "days": [1.0]}}, "cadence_config.days[0]", "1.0"),
        ({"cadence_config": {"mode": "weekly", "days": "1"}}, "cadence_config.days", "'1'"),
        ({"cadence_config": {"mode": "custom", "days": []}}, "cadence_config.days", "none"),
        ({"cadence_config": {"mode": "custom"}}, "cadence_config.days", "none"),
        ({"timezone": "Mars/Olympus"}, "timezone", "'Mars/Olympus'"),
        ({"timezone": ""}, "timezone", "''"),
        ({"timezone": "europe/london"}, "timezone", "'europe/london'"),
        ({"timezone": "../etc/passwd"}, "timezone", "'../etc/passwd'"),
        ({"timezone": "localtime"}, "timezone", "'localtime'"),
        ({"timezone": 0}, "timezone", "0"),
        ({"after": datetime(2025, 1, 1)}, "after", "naive 2025-01-01T00:00:00"),
        ({"after": date(2025, 1, 1)}, "after", "date"),
        ({"delivery_time": time(9, tzinfo=UTC)}, "delivery_time", "aware 09:00:00+00:00"),
        ({"delivery_time": "09:00"}, "delivery_time", "'09:00'"),
        ({"delivery_time": datetime(2025, 1, 1, 9)}, "delivery_time", "datetime"),
    ],
)
def test_invalid_input_raises_cadence_error_naming_field_and_value(
    overrides: dict[str, Any], field: str, shown: str
) -> None:
    with pytest.raises(CadenceError) as caught:
        next_occurrence(**{**GOOD, **overrides})
    error = caught.value
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert shown in str(error)
    assert isinstance(error, ValueError) and isinstance(error, InvalidItemError)


def test_error_messages_read_as_documented() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"cadence_config": {"mode": "fortnightly"}},
            "cadence_config.mode: unknown mode 'fortnightly'"
            " (expected daily, weekdays, weekly or custom)",
        ),
        (
            {"cadence_config": {"mode": "custom", "days": [0, 1, 7]}},
            "cadence_config.days[2]: 7 is not a day number 0-6 (0 = Sunday)",
        ),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown IANA time zone 'Mars/Olympus'"),
        (
            {"after": datetime(2025, 1, 1)},
            "after: must be timezone-aware, got naive 2025-01-01T00:00:00",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(CadenceError) as caught:
            next_occurrence(**{**GOOD, **overrides})
        assert str(caught.value) == message


def test_cadence_error_survives_pickling_with_its_field() -> None:
    error = pickle.loads(pickle.dumps(CadenceError("timezone", "unknown IANA time zone 'X'")))
    assert error.field == "timezone"
    assert str(error) == "timezone: unknown IANA time zone 'X'"
