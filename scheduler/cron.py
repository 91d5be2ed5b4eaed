"""A small 5-field cron parser (no dependency): `minute hour day-of-month month day-of-week`.

Each field takes `*`, numbers, lists (`1,15`), ranges (`1-5`) and steps (`*/15`, `0-30/10`,
`5/20` = from 5 to the field's maximum). Day of week is 0-6 with 0 (and 7) Sunday. Macros:
`@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly`, `@yearly` (`@annually`). Times are UTC.
As in Vixie cron, when both day fields are restricted a day matching either one fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
# (name, low, high) of the five fields, in order.
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7))
# A schedule that finds no time within this many years never fires (e.g. "0 0 30 2 *").
SEARCH_YEARS = 5


class CronError(ValueError):
    """A cron expression that cannot be parsed, or that never fires."""


def _number(text: str, name: str, low: int, high: int) -> int:
    if not text.isdigit():
        raise CronError(f"{name}: {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{name}: {value} is out of range {low}-{high}")
    return value


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{name}: empty list element in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not 1 <= int(step_text) <= high - low + 1:
                raise CronError(f"{name}: step in {part!r} must be a number from 1 to {high - low + 1}")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = _number(first, name, low, high), _number(last, name, low, high)
            if start > end:
                raise CronError(f"{name}: range {base!r} runs backwards")
        else:
            start = _number(base, name, low, high)
            end = high if slash else start  # "5/20": from 5 to the maximum, every 20
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def _day_matches(self, when: datetime) -> bool:
        day_ok = when.day in self.days
        weekday_ok = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def next_after(self, when: datetime) -> datetime:
        """The first fire time strictly after `when` (a naive `when` is taken as UTC)."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when = when.astimezone(UTC)
        t = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * SEARCH_YEARS)
        # Skip whole months, days and hours that cannot match: a few hundred steps at most a year.
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        raise CronError(f"{self.expression!r} never fires (no matching time within {SEARCH_YEARS} years)")


def parse_cron(expression: str) -> Cron:
    """Parse and check an expression; raises CronError naming the field that is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise CronError("empty cron expression")
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise CronError(f"unknown macro {text!r}; known: {', '.join(MACROS)}")
        text = MACROS[text.lower()]
    parts = text.split()
    if len(parts) != 5:
        raise CronError(f"{expression!r} has {len(parts)} fields; want 5: minute hour day-of-month month "
                        "day-of-week (or @hourly, @daily, ...)")
    minutes, hours, days, months, weekdays = (_parse_field(part, *field) for part, field in zip(parts, FIELDS))
    weekdays = frozenset(d % 7 for d in weekdays)  # 7 is Sunday too
    cron = Cron(expression.strip(), minutes, hours, days, months, weekdays,
                days_restricted=not parts[2].startswith("*"),
                weekdays_restricted=not parts[4].startswith("*"))
    cron.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # an expression that never fires is an error now
    return cron
