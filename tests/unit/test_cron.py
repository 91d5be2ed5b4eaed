"""The cron parser: next fire times, and bad expressions named clearly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from scheduler.cron import CronError, parse_cron


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.mark.parametrize("expression, after, expected", [
    ("0 3 * * *", at(2026, 3, 1, 2, 59), at(2026, 3, 1, 3, 0)),
    ("0 3 * * *", at(2026, 3, 1, 3, 0), at(2026, 3, 2, 3, 0)),  # strictly after
    ("0 3 * * *", at(2026, 12, 31, 4, 0), at(2027, 1, 1, 3, 0)),  # over the year's end
    ("*/15 * * * *", at(2026, 3, 1, 10, 7, 30), at(2026, 3, 1, 10, 15)),
    ("5/20 * * * *", at(2026, 3, 1, 10, 46), at(2026, 3, 1, 11, 5)),  # 5, 25, 45
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
])
def test_next_fire_times(expression, after, expected):
    assert parse_cron(expression).next_after(after) == expected


def test_naive_times_are_utc_and_successive_times_advance():
    cron = parse_cron("*/20 * * * *")
    assert cron.next_after(datetime(2026, 3, 1, 10, 0)) == at(2026, 3, 1, 10, 20)
    when, times = at(2026, 3, 1, 23, 30), []
    for _ in range(4):
        when = cron.next_after(when)
        times.append(when)
    assert times == [at(2026, 3, 1, 23, 40), at(2026, 3, 2, 0, 0), at(2026, 3, 2, 0, 20), at(2026, 3, 2, 0, 40)]


@pytest.mark.parametrize("expression, message", [
    ("", "empty cron expression"),
    ("0 3 * *", "has 4 fields; want 5"),
    ("0 3 * * * *", "has 6 fields; want 5"),
    ("60 * * * *", "minute: 60 is out of range 0-59"),
    ("0 24 * * *", "hour: 24 is out of range 0-23"),
    ("0 0 0 * *", "day-of-month: 0 is out of range 1-31"),
    ("0 0 * 13 *", "month: 13 is out of range 1-12"),
    ("0 0 * * 8", "day-of-week: 8 is out of range 0-7"),
    ("x * * * *", "minute: 'x' is not a number"),
    ("*/0 * * * *", "minute: step in '*/0' must be a number from 1 to 60"),
    ("5-1 * * * *", "minute: range '5-1' runs backwards"),
    ("1,,2 * * * *", "minute: empty list element"),
    ("@often", "unknown macro '@often'"),
    ("0 0 30 2 *", "never fires"),
])
def test_bad_expressions_say_what_is_wrong(expression, message):
    with pytest.raises(CronError, match=message.replace("*", r"\*").replace("(", r"\(")):
        parse_cron(expression)
