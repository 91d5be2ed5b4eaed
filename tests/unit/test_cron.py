"""Cron expressions: next fire times in UTC and in a schedule's zone (across DST), names, and
bad expressions and zones named clearly as input errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from lcmq.errors import InputError, LcmqError
from scheduler.cron import CronError, parse_cron

BERLIN = ZoneInfo("Europe/Berlin")


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def fires(expression: str, zone: str, after: datetime, count: int) -> list[datetime]:
    cron, times = parse_cron(expression, zone), []
    for _ in range(count):
        after = cron.next_after(after)
        times.append(after)
    return times


@pytest.mark.parametrize(
    "expression, after, expected",
    [
        ("0 3 * * *", at(2026, 3, 1, 2, 59), at(2026, 3, 1, 3, 0)),
        ("0 3 * * *", at(2026, 3, 1, 3, 0), at(2026, 3, 2, 3, 0)),  # strictly after
        ("0 3 * * *", at(2026, 12, 31, 4, 0), at(2027, 1, 1, 3, 0)),  # over the year's end
        ("*/15 * * * *", at(2026, 3, 1, 10, 7, 30), at(2026, 3, 1, 10, 15)),
        ("0-30/10 8 * * *", at(2026, 3, 1, 8, 21), at(2026, 3, 1, 8, 30)),
        ("0 9,17 * * *", at(2026, 3, 1, 9, 0), at(2026, 3, 1, 17, 0)),
        ("*/15 9-17 * * 1-5", at(2026, 1, 3, 3, 5), at(2026, 1, 5, 9, 0)),  # Sat -> Mon 09:00
        ("0 0 * * 7", at(2026, 1, 1), at(2026, 1, 4)),  # 7 is Sunday too
        ("0 0 29 2 *", at(2026, 1, 1), at(2028, 2, 29)),  # the next leap day
        ("0 0 13 * 5", at(2026, 2, 1), at(2026, 2, 6)),  # both day fields restricted: either matches
        ("30 1 1 1-3 *", at(2026, 3, 2), at(2027, 1, 1, 1, 30)),
        ("@hourly", at(2026, 3, 1, 10, 0), at(2026, 3, 1, 11, 0)),
        ("@daily", at(2026, 3, 1, 10, 0), at(2026, 3, 2, 0, 0)),
        ("@weekly", at(2026, 3, 1, 10, 0), at(2026, 3, 8, 0, 0)),  # 2026-03-01 is a Sunday
        ("@monthly", at(2026, 3, 1, 10, 0), at(2026, 4, 1, 0, 0)),
        ("@yearly", at(2026, 3, 1), at(2027, 1, 1)),
        # Month and weekday names, any case.
        ("0 9 * * mon-fri", at(2026, 1, 3), at(2026, 1, 5, 9, 0)),  # Sat -> Mon
        ("0 9 * * SAT,sun", at(2026, 1, 5), at(2026, 1, 10, 9, 0)),
        ("0 0 1 jan,jul *", at(2026, 2, 1), at(2026, 7, 1)),
        ("30 6 * Dec-Feb mon", at(2026, 3, 1), at(2026, 12, 7, 6, 30)),
    ],
)
def test_next_fire_times(expression, after, expected):
    assert parse_cron(expression).next_after(after) == expected


def test_naive_times_are_utc_and_successive_times_advance():
    cron = parse_cron("*/20 * * * *")
    assert cron.next_after(datetime(2026, 3, 1, 10, 0)) == at(2026, 3, 1, 10, 20)
    assert fires("*/20 * * * *", "UTC", at(2026, 3, 1, 23, 30), 4) == [
        at(2026, 3, 1, 23, 40),
        at(2026, 3, 2, 0, 0),
        at(2026, 3, 2, 0, 20),
        at(2026, 3, 2, 0, 40),
    ]


def test_six_in_berlin_is_four_utc_in_summer_and_five_in_winter_across_both_dst_changes():
    # 2026: clocks go forward on Sunday 29 March (02:00 -> 03:00), back on Sunday 25 October.
    # Berlin is UTC+1 in winter (CET) and UTC+2 in summer (CEST).
    assert fires("0 6 * * *", "Europe/Berlin", at(2026, 3, 27), 4) == [
        at(2026, 3, 27, 5),
        at(2026, 3, 28, 5),
        at(2026, 3, 29, 4),
        at(2026, 3, 30, 4),
    ]
    assert fires("0 6 * * *", "Europe/Berlin", at(2026, 10, 23), 4) == [
        at(2026, 10, 23, 4),
        at(2026, 10, 24, 4),
        at(2026, 10, 25, 5),
        at(2026, 10, 26, 5),
    ]


def test_six_in_berlin_fires_once_every_day_of_2026_never_twice_never_skipped():
    cron, when, times = parse_cron("0 6 * * *", "Europe/Berlin"), at(2025, 12, 31, 12), []
    while (when := cron.next_after(when)) < at(2027, 1, 1):
        times.append(when)
    local = [t.astimezone(BERLIN) for t in times]
    assert [t.date() for t in local] == [datetime(2026, 1, 1).date() + timedelta(days=d) for d in range(365)]
    assert {(t.hour, t.minute) for t in local} == {(6, 0)}
    summer = {t.date() for t in times if t.hour == 4}  # the rest fire at 05:00 UTC
    assert min(summer).isoformat() == "2026-03-29" and max(summer).isoformat() == "2026-10-24"
    assert len(summer) == 210 and sum(1 for t in times if t.hour == 5) == 365 - 210


@pytest.mark.parametrize(
    "expression, after, expected_local",
    [
        # Spring forward: 02:30 does not exist on 29 March; it fires once, when the gap ends (03:00).
        ("30 2 * * *", at(2026, 3, 27, 12), ["03-28 02:30", "03-29 03:00", "03-30 02:30"]),
        ("0 * * * *", at(2026, 3, 28, 23, 30), ["03-29 01:00", "03-29 03:00", "03-29 04:00"]),
        # Fall back: 02:30 happens twice on 25 October; a fixed time fires at the first only...
        ("30 2 * * *", at(2026, 10, 23, 12), ["10-24 02:30", "10-25 02:30", "10-26 02:30"]),
        ("0 1-3 * * *", at(2026, 10, 24, 22), ["10-25 01:00", "10-25 02:00", "10-25 03:00", "10-26 01:00"]),
        # ...while a job that runs every hour keeps going by elapsed time through the repeated hour.
        ("*/30 * * * *", at(2026, 10, 25, 0, 10), ["10-25 02:30", "10-25 02:00", "10-25 02:30", "10-25 03:00"]),
    ],
)
def test_times_the_clock_skips_or_repeats_fire_once(expression, after, expected_local):
    times = fires(expression, "Europe/Berlin", after, len(expected_local))
    assert [t.astimezone(BERLIN).strftime("%m-%d %H:%M") for t in times] == expected_local
    assert times == sorted(set(times))  # strictly increasing


def test_a_run_inside_the_repeated_hour_does_not_fire_its_time_again():
    # The scheduler fired 02:30 (first time, 00:30 UTC); asked again during the second 02:xx.
    cron = parse_cron("30 2 * * *", "Europe/Berlin")
    assert cron.next_after(at(2026, 10, 25, 1, 10)) == at(2026, 10, 26, 1, 30)


@pytest.mark.parametrize(
    "expression, message",
    [
        ("", "--cron: empty cron expression"),
        ("0 3 * *", "has 4 fields; want 5"),
        ("0 3 * * * *", "has 6 fields; want 5"),
        ("60 * * * *", "minute: '60' is not valid in '60 * * * *' (takes 0-59"),
        ("0 24 * * *", "hour: '24' is not valid"),
        ("0 0 0 * *", "day-of-month: '0' is not valid"),
        ("0 0 * 13 *", "month: '13' is not valid"),
        ("0 0 * foo *", "month: 'foo' is not valid in '0 0 * foo *' (takes 1-12 or jan-dec"),
        ("0 0 * * 8", "day-of-week: '8' is not valid"),
        ("0 0 * * mon-fry", "day-of-week: 'mon-fry' is not valid"),
        ("x * * * *", "minute: 'x' is not valid"),
        ("*/0 * * * *", "minute: '*/0' is not valid"),
        ("1,,2 * * * *", "minute: '1,,2' is not valid"),
        ("@often", "unknown macro '@often'"),
        ("0 0 30 2 *", "'0 0 30 2 *' never fires"),
    ],
)
def test_bad_expressions_are_input_errors_that_say_what_is_wrong(expression, message):
    with pytest.raises(CronError) as raised:
        parse_cron(expression, source="schedule shop")
    assert message in str(raised.value) and str(raised.value).startswith("schedule shop:--cron: ")
    assert isinstance(raised.value, InputError) and isinstance(raised.value, LcmqError)
    assert not isinstance(raised.value, ValueError) and raised.value.field == "--cron"


@pytest.mark.parametrize("zone", ["Europe/Berln", "Mars/Olympus", "../../etc/passwd", "/etc/localtime", " "])
def test_a_bad_zone_is_an_input_error_naming_the_flag(zone):
    with pytest.raises(InputError) as raised:
        parse_cron("0 6 * * *", zone, source="schedule shop")
    assert str(raised.value).startswith("schedule shop:--tz: ") and raised.value.field == "--tz"
