"""Cron expressions (parsed by croniter), evaluated in a schedule's time zone.

Five fields, `minute hour day-of-month month day-of-week`: numbers, lists (`1,15`), ranges
(`1-5`), steps (`*/15`), month and weekday names (`jan-mar`, `mon-fri`), 0 and 7 both Sunday;
or a macro: `@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly`, `@yearly` (`@annually`).
As in Vixie cron, when both day fields are restricted a day matching either one fires.

The fields are wall-clock times in the schedule's zone (an IANA name such as Europe/Berlin;
default UTC), so `0 6 * * *` in Europe/Berlin fires at 06:00 local time all year: 05:00 UTC in
summer, 06:00 UTC in winter. Next fire times come back in UTC, which is what is stored. Across
a DST change, as in cronie:
- spring forward: a time the clock skips (02:30 on the last Sunday of March in Berlin) fires
  once, at the first instant after the gap (03:00 local);
- fall back: a time the clock shows twice fires at its first occurrence only; a job that runs
  every hour (its hour field covers all 24) keeps running by elapsed time through both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from lcmq.errors import InputError

DEFAULT_ZONE = "UTC"
MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
# What each of the five fields takes, in order: named in the message when one is wrong.
FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 (0 and 7 are Sunday) or sun-sat"),
)
HOUR_FIELD = 1
HOURS_PER_DAY = 24
# A fall-back day repeats one hour; skipping the repeats of a time never takes more tries than this.
MAX_REPEATS_SKIPPED = 4


class CronError(InputError):
    """A cron expression or time zone a user gave that cannot be used (the flag is named)."""

    def __init__(self, source: str, field: str, message: str):
        super().__init__(source, None, field, message)


def check_zone(name: str, source: str = "cron") -> ZoneInfo:
    """The zone of an IANA name; a CronError naming --tz when there is no such zone."""
    if not isinstance(name, str) or not name.strip():
        raise CronError(source, "--tz", "must not be empty (an IANA name such as Europe/Berlin, or UTC)")
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):  # ValueError: a path, not a key ("../x")
        raise CronError(
            source,
            "--tz",
            f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin, America/New_York or UTC",
        ) from None


def _check_fields(parts: list[str], expression: str, source: str) -> None:
    """Name the field that is wrong: croniter's own message names only the whole expression."""
    for index, (part, (name, values)) in enumerate(zip(parts, FIELDS, strict=False)):
        alone = ["*"] * len(FIELDS)
        alone[index] = part
        try:
            croniter(" ".join(alone))
        except CroniterError:
            wrong = f"{name}: {part!r} is not valid in {expression!r}"
            usage = f"takes {values}; lists 1,15, ranges 1-5, steps */15"
            raise CronError(source, "--cron", f"{wrong} ({usage})") from None


class Cron:
    """A checked expression in a zone; next_after gives its fire times in UTC."""

    def __init__(self, expression: str, fields: str, zone: ZoneInfo, source: str):
        self.expression = expression
        self.zone = zone
        self.source = source
        self._fields = fields
        hours = croniter(fields).expanded[HOUR_FIELD]
        # "Every hour" jobs follow elapsed time through a fall-back hour; fixed times fire once.
        self._every_hour = hours == ["*"] or len(set(hours)) == HOURS_PER_DAY

    def _repeated_wall_time(self, fire: datetime) -> bool:
        """The second time the clock shows this local time (fall back): already fired once."""
        return not self._every_hour and fire.astimezone(UTC).astimezone(self.zone).fold == 1

    def next_after(self, when: datetime) -> datetime:
        """The first fire time strictly after `when`, in UTC (a naive `when` is taken as UTC)."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        times = croniter(self._fields, when.astimezone(self.zone))
        try:
            for _ in range(MAX_REPEATS_SKIPPED):
                fire = times.get_next(datetime)
                if fire > when and not self._repeated_wall_time(fire):
                    return fire.astimezone(UTC)
        except CroniterBadDateError:
            raise CronError(
                self.source, "--cron", f"{self.expression!r} never fires (no date matches its day and month fields)"
            ) from None
        raise CronError(self.source, "--cron", f"{self.expression!r} has no fire time after {when:%Y-%m-%d}")


def parse_cron(expression: str, zone: str = DEFAULT_ZONE, source: str = "cron") -> Cron:
    """Parse and check an expression in a zone; raises CronError (an InputError) naming the flag,
    and for a bad field the field. `source` says whose expression it is in the message."""
    if not isinstance(expression, str) or not expression.strip():
        raise CronError(source, "--cron", "empty cron expression")
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise CronError(source, "--cron", f"unknown macro {text!r}; known: {', '.join(MACROS)}")
        text = MACROS[text.lower()]
    parts = text.split()
    if len(parts) != len(FIELDS):
        raise CronError(
            source,
            "--cron",
            f"{expression!r} has {len(parts)} fields; want 5: minute hour "
            "day-of-month month day-of-week (or @hourly, @daily, ...)",
        )
    _check_fields(parts, expression, source)
    try:
        cron = Cron(expression.strip(), " ".join(parts), check_zone(zone, source), source)
    except CroniterError as exc:  # each field alone is fine, their combination is not
        raise CronError(source, "--cron", f"{expression!r} is not valid: {exc}") from None
    cron.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # an expression that never fires is an error now
    return cron
