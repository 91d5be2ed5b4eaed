"""Every database operation of lcmq. Callers get plain records, never a session.

Driver errors are translated here (`raise ... from`), by exception class and SQLSTATE: a lost
connection or a lost race becomes a transient DatabaseError, a missing table a SchemaError that
says to run `lcmq db upgrade`, refused data a RecordError, any other refusal a QueryError.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    ColumnElement,
    Connection,
    CursorResult,
    DateTime,
    Engine,
    Result,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy import column as sa_column
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import values as sa_values
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from lcmq.errors import DatabaseError, LcmqError, NotFoundError, QueryError, RecordError, SchemaError
from lcmq.models import (
    ApiKey,
    Base,
    Batch,
    BatchCount,
    CatalogItem,
    Job,
    JobState,
    Schedule,
    WebhookAttempt,
    WebhookDelivery,
    WorkerProcess,
    WorkerToken,
)
from lcmq.spec import render_shape


class AnyOwner:
    """The `owner` filter that filters nothing (None already means "made on the CLI")."""


ANY_OWNER = AnyOwner()


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; everything lcmq writes is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class BatchRecord:
    id: str
    name: str | None
    profile: str
    total: int
    seed: int
    output: str
    options: dict[str, Any]
    created_at: datetime
    idempotency_key: str | None
    priority: int
    canceled_at: datetime | None
    published_at: datetime | None
    manifest_at: datetime | None
    owner: str | None = None  # the API key's name; None: made on the CLI (lcmq.access)
    webhook_url: str | None = None
    webhook_queued_at: datetime | None = None


@dataclass(frozen=True)
class StoredImage:
    """A rendered job's result, ready to be recorded."""

    job_id: str
    key: str
    sha256: str
    render_ms: float
    batch_size: int
    warning: str | None = None
    # The job's controls as rendered: each entry with the sha256 of its preprocessed image.
    control: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class PendingJob:
    """A queued job waiting for a message: what dispatch needs to route and chunk it."""

    id: str
    batch_id: str
    shape: tuple  # lcmq.spec.render_shape: size, steps, guidance, LoRA set, img2img strength, controls
    attempts: int


# Where a new job's column value comes from (the `metadata` of JobRecord's fields): the
# producer's job row (scheduler.batches.job_row), or the batch (one value for all its jobs, given
# by Repository._write_jobs). Every other column, and a row's column that the row leaves out,
# starts at its scalar lcmq.models default (state queued, attempts 0) or NULL.
FROM_ROW = {"written_from": "row"}
FROM_BATCH = {"written_from": "batch"}


@dataclass(frozen=True)
class JobRecord:
    """A job row, and the one table of job columns: a field per column of lcmq.models.Job (the
    field's name is the mapped attribute: "meta" is the "metadata" column). The record read back,
    the claim's RETURNING, and the COPY row and insert of a new job all follow these fields, so a
    new column is one line here (and its Job column and migration)."""

    id: str = field(metadata=FROM_ROW)
    batch_id: str = field(metadata=FROM_BATCH)
    index: int = field(metadata=FROM_ROW)
    state: str
    prompt: str = field(metadata=FROM_ROW)
    negative_prompt: str = field(metadata=FROM_ROW)
    seed: int = field(metadata=FROM_ROW)
    steps: int = field(metadata=FROM_ROW)
    guidance: float = field(metadata=FROM_ROW)
    width: int = field(metadata=FROM_ROW)
    height: int = field(metadata=FROM_ROW)
    meta: dict[str, Any] = field(metadata=FROM_ROW)
    attempts: int
    worker: str | None
    error: str | None
    key: str | None = field(metadata=FROM_ROW)  # catalog jobs get a stable per-item key at creation
    sha256: str | None
    render_ms: float | None
    batch_size: int | None
    warning: str | None
    # dispatched_at = created_at at creation: the batch's publish covers every job (mark_published).
    dispatched_at: datetime | None = field(metadata=FROM_BATCH)
    created_at: datetime = field(metadata=FROM_BATCH)
    started_at: datetime | None
    finished_at: datetime | None
    # catalog jobs: the item's version (see scheduler/catalog.py)
    render_key: str | None = field(default=None, metadata=FROM_ROW)
    # style LoRAs, sorted by name (lcmq.loras)
    loras: list[dict[str, Any]] | None = field(default=None, metadata=FROM_ROW)
    # img2img: s3:// or file:// URL of the init image
    init_image: str | None = field(default=None, metadata=FROM_ROW)
    strength: float | None = field(default=None, metadata=FROM_ROW)  # img2img strength; None: text2img
    # ControlNets / T2I-Adapters, sorted by name (lcmq.controls)
    control: list[dict[str, Any]] | None = field(default=None, metadata=FROM_ROW)
    lease_until: datetime | None = None  # while running: when another worker may take the job
    handbacks: int = 0  # times handed back after a transient fault (capped by max_handbacks)


@dataclass(frozen=True)
class ScheduleRecord:
    name: str
    catalog: str
    template: str
    cron: str
    profile: str
    options: dict[str, Any]
    paused: bool
    next_run_at: datetime | None
    version: int
    last_run_at: datetime | None
    last_batch_id: str | None
    last_counts: dict[str, Any] | None
    last_error: str | None
    created_at: datetime
    timezone: str = "UTC"  # the IANA zone of the cron fields
    owner: str | None = None  # as BatchRecord.owner


@dataclass(frozen=True)
class ApiKeyRecord:
    name: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class WorkerTokenRecord:
    """A worker token's row (lcmq.models.WorkerToken), never the token itself."""

    name: str
    profiles: list[str]
    cost_per_hour: float | None
    created_at: datetime
    revoked_at: datetime | None
    paused_at: datetime | None
    failures_in_a_row: int
    last_claim_at: datetime | None

    @property
    def state(self) -> str:
        """ "revoked", "paused" (too many failed jobs in a row) or "active"."""
        if self.revoked_at is not None:
            return "revoked"
        return "paused" if self.paused_at is not None else "active"


# A worker is stale after this many of its own heartbeat intervals without a heartbeat.
STALE_AFTER_BEATS = 3


@dataclass(frozen=True)
class WorkerRecord:
    """A worker process's row (lcmq.models.WorkerProcess), as its heartbeat last wrote it."""

    node: str
    host: str
    pid: int
    profile: str
    device: str
    batch_size: int | None
    peak_memory_mb: float | None
    load_s: float | None
    images: int
    render_s: float
    cost_per_hour: float | None
    heartbeat_s: float
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    model_cache: str | None = None  # s3:// models at load: "hit", "miss", "partial"; None without
    fetch_s: float | None = None

    def state(self, now: datetime) -> str:
        """ "stopped" (it said so), "stale" (no heartbeat for STALE_AFTER_BEATS intervals: killed,
        frozen or cut off) or "live"."""
        if self.stopped_at is not None:
            return "stopped"
        if now - self.last_seen_at > timedelta(seconds=STALE_AFTER_BEATS * self.heartbeat_s):
            return "stale"
        return "live"


@dataclass(frozen=True)
class WorkerJobSums:
    """One worker's images of one batch (Repository.worker_job_sums): what `lcmq report` prices."""

    worker: str  # jobs.worker
    images: int  # succeeded jobs
    failed: int
    render_ms: float  # Σ render_ms of its images: its pipeline seconds × 1000
    first_started_at: datetime | None  # of its images; None when it has none
    last_finished_at: datetime | None


@dataclass(frozen=True)
class WorkerBeat:
    """What a heartbeat writes: the process's counters and what its load has found out."""

    images: int
    render_s: float
    peak_memory_mb: float | None = None
    load_s: float | None = None
    batch_size: int | None = None
    device: str | None = None  # the resolved device once loaded ("auto" becomes cpu/cuda/mps)
    model_cache: str | None = None  # s3:// models: "hit", "miss" or "partial" once loaded
    fetch_s: float | None = None


@dataclass(frozen=True)
class WebhookDeliveryRecord:
    """A row of the webhook outbox (lcmq.models.WebhookDelivery)."""

    id: str  # the webhook-id header: the same on every attempt, so receivers can drop repeats
    batch_id: str
    event: str
    url: str
    owner: str | None
    body: str  # the exact text signed and sent
    state: str  # WEBHOOK_PENDING, WEBHOOK_DELIVERED or WEBHOOK_FAILED
    attempts: int
    next_attempt_at: datetime | None
    claimed_until: datetime | None
    give_up_at: datetime
    delivered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class WebhookAttemptRecord:
    attempted_at: datetime
    status_code: int | None  # None: no answer (refused URL, connection error, timeout)
    error: str | None
    duration_ms: float


# The states of a webhook delivery: pending until a 2xx (delivered) or its give_up_at (failed).
WEBHOOK_PENDING = "pending"
WEBHOOK_DELIVERED = "delivered"
WEBHOOK_FAILED = "failed"
FINAL_EVENT = "batch.final"
# Builds a delivery's body from the batch and its state counts (lcmq.webhooks.final_body).
WebhookBody = Callable[[BatchRecord, dict[str, int]], str]


@dataclass(frozen=True)
class ItemState:
    """What a catalog's state says about one item: its last render key and that job's state."""

    render_key: str
    job_state: str | None
    removed: bool


def _job_column(name: str) -> Column:
    """The jobs table column of a JobRecord field (the mapped attribute's column)."""
    return Job.__mapper__.attrs[name].columns[0]


JOB_COLUMNS: dict[str, Column] = {f.name: _job_column(f.name) for f in fields(JobRecord)}
# JobRecord's fields as labelled columns, for Core statements that skip the ORM's per-row
# objects: a claim returns its rows at the cost of plain tuples.
_JOB_RECORD_COLUMNS = tuple(column.label(name) for name, column in JOB_COLUMNS.items())
_JOB_TIME_FIELDS = tuple(name for name, column in JOB_COLUMNS.items() if isinstance(column.type, DateTime))


def _job_records(rows) -> list[JobRecord]:
    records = []
    for row in rows:
        values = row._asdict()
        for name in _JOB_TIME_FIELDS:
            values[name] = _aware(values[name])
        records.append(JobRecord(**values))
    return records


def _like_escaped(text: str) -> str:
    """`text` matched literally by LIKE ... ESCAPE '\\' (its % and _ are not wildcards)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _record(cls, row) -> Any:
    values = {f.name: getattr(row, f.name) for f in fields(cls)}
    for name, value in values.items():
        if isinstance(value, datetime):
            values[name] = _aware(value)
    return cls(**values)


def _shape(row) -> tuple:
    return render_shape(row.width, row.height, row.steps, row.guidance, row.loras, row.strength, row.control)


def normalize_url(url: str) -> str:
    """Let users write postgresql:// URLs; lcmq drives Postgres with psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the producer read while workers write; busy_timeout rides out short locks.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


# One engine per (url, process): a forked worker child must never reuse its parent's sockets.
_ENGINES: dict[tuple[str, int], Engine] = {}


def engine_for(url: str) -> Engine:
    key = (url, os.getpid())
    if key not in _ENGINES:
        _ENGINES[key] = _make_engine(url)
    return _ENGINES[key]


def _scalar_default(column: Column) -> Any:
    default = column.default
    return default.arg if isinstance(default, ScalarElementColumnDefault) else None


@dataclass(frozen=True)
class NewJobLayout:
    """How a new job row is written, read off JobRecord's fields: the values a producer's row
    gives (`row_defaults` holds them in order, with what a row that leaves one out gets), then
    one value per batch, then the columns that start at a scalar model default. Columns in none
    of these start NULL and are not written."""

    row_defaults: dict[str, Any]
    batch_fields: tuple[str, ...]
    defaults: dict[str, Any]

    @classmethod
    def of_job_record(cls) -> NewJobLayout:
        job_fields = fields(JobRecord)
        defaults = {f.name: _scalar_default(JOB_COLUMNS[f.name]) for f in job_fields if not f.metadata}
        return cls(
            row_defaults={f.name: _scalar_default(JOB_COLUMNS[f.name]) for f in job_fields if f.metadata == FROM_ROW},
            batch_fields=tuple(f.name for f in job_fields if f.metadata == FROM_BATCH),
            defaults={name: value for name, value in defaults.items() if value is not None},
        )

    @property
    def row_fields(self) -> tuple[str, ...]:
        return tuple(self.row_defaults)

    @property
    def fields(self) -> tuple[str, ...]:
        """JobRecord's field names, in the order of the values of `rows`."""
        return (*self.row_fields, *self.batch_fields, *self.defaults)

    @property
    def columns(self) -> tuple[str, ...]:
        """The jobs table's column names, in the order of the values of `rows`."""
        return tuple(JOB_COLUMNS[name].name for name in self.fields)

    @property
    def json_positions(self) -> tuple[int, ...]:
        """Where in a row the JSON columns are (COPY takes them as text)."""
        return tuple(i for i, name in enumerate(self.row_fields) if isinstance(JOB_COLUMNS[name].type, JSON))

    def rows(self, jobs: Iterable[dict[str, Any]], batch_values: dict[str, Any]) -> Iterator[list[Any]]:
        """Each job's column values, a list a job: its row's (the column's default where the row
        has no such key), then the batch's, then the defaults."""
        if set(batch_values) != set(self.batch_fields):
            raise ValueError(f"a new job's batch values are {self.batch_fields}, got {tuple(batch_values)}")
        tail = [batch_values[name] for name in self.batch_fields] + list(self.defaults.values())
        every_row_value = itemgetter(*self.row_fields)  # one C call for a complete row (job_row's)
        row_defaults = tuple(self.row_defaults.items())
        for job in jobs:
            try:
                yield [*every_row_value(job), *tail]
            except KeyError:  # a row that leaves columns out
                yield [job.get(name, default) for name, default in row_defaults] + tail


NEW_JOB = NewJobLayout.of_job_record()


def _table_of(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)  # typed as a FromClause; Core's update() wants the Table
    return table


JOBS_TABLE = _table_of(Job)


def _rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE touched (SQLAlchemy types execute() as a Result; for these
    statements it is a CursorResult)."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def _copy_jobs(session: Session, jobs: Iterable[dict[str, Any]], batch_values: dict[str, Any]) -> int:
    """Postgres: stream the rows with COPY (about 20x executemany) inside the session's
    transaction; psycopg's write_row formats and escapes each value."""
    driver_connection = session.connection().connection.driver_connection
    assert driver_connection is not None  # a checked-out connection always has one
    cursor = driver_connection.cursor()
    columns = ", ".join(f'"{c}"' for c in NEW_JOB.columns)  # quoted: "index" is a keyword
    json_positions = NEW_JOB.json_positions
    dumps = json.dumps
    # The batch's values are the same in every row: a timestamp goes as its text, formatted once
    # here rather than by write_row for each row (that was most of write_row's time).
    batch_texts = {
        name: value.isoformat() if isinstance(value, datetime) else value for name, value in batch_values.items()
    }
    total = 0
    with cursor.copy(f"COPY jobs ({columns}) FROM STDIN") as copy:
        for values in NEW_JOB.rows(jobs, batch_texts):
            for position in json_positions:  # a JSON value goes as its text (None stays NULL)
                if values[position] is not None:
                    values[position] = dumps(values[position])
            copy.write_row(values)
            total += 1
    return total


def _insert_jobs(session: Session, jobs: Iterable[dict[str, Any]], batch_values: dict[str, Any], page: int) -> int:
    """Other databases (SQLite): executemany of the same values, page by page."""
    names = NEW_JOB.fields  # the ORM's bulk insert takes the mapped attributes' names
    statement = insert(Job)
    rows: list[dict[str, Any]] = []
    total = 0
    for values in NEW_JOB.rows(jobs, batch_values):
        rows.append(dict(zip(names, values, strict=True)))
        if len(rows) >= page:
            session.execute(statement, rows)
            total, rows = total + len(rows), []
    if rows:
        session.execute(statement, rows)
        total += len(rows)
    return total


# SQLSTATEs (PostgreSQL's appendix A) that a retry can outlive: the transaction lost a race that
# a rerun wins, or the server is going away or short of something for a while. Anything else
# Postgres refuses is the fault of the statement or its data, and a retry would repeat it.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "57014",  # query_canceled: a statement timeout, pg_cancel_backend
        "57P01",
        "57P02",
        "57P03",  # admin_shutdown, crash_shutdown, cannot_connect_now
        "57P05",  # idle_session_timeout
    }
)
TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "58")  # connection exception, insufficient resources, system error
REFUSED_DATA_SQLSTATE_CLASSES = ("22", "23")  # data exception, integrity constraint violation
UNDEFINED_TABLE = "42P01"
# SQLite has no SQLSTATE; its primary result codes (the low byte of an extended one). Busy and
# locked: another connection held the database past busy_timeout; full, I/O error and protocol
# (a WAL lock race): the disk or the file system, as Postgres's classes 53 and 58.
SQLITE_RETRYABLE = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PROTOCOL}
)


def database_error_kind(exc: BaseException) -> type[LcmqError] | None:
    """The lcmq error a database failure is, by the driver's exception class and SQLSTATE (or
    SQLite's result code), never by its message; None when `exc` is no database failure.

    Transient (DatabaseError): the connection or the server went away, or a race a rerun wins.
    Permanent: the data was refused (RecordError), a missing table (SchemaError), and every
    other refusal, a bug in the statement (QueryError).
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return DatabaseError
    driver: BaseException = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    if isinstance(driver, sqlite3.Error):
        return _sqlite_error_kind(driver)
    if _is_psycopg_error(driver):
        return _postgres_error_kind(driver)
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):  # the pool: lost, or none free
        return DatabaseError
    if isinstance(exc, sa_exc.SQLAlchemyError):  # a statement SQLAlchemy could not build or run
        return QueryError
    return None


def _is_psycopg_error(exc: BaseException) -> bool:
    # psycopg is in sys.modules once anything connected to Postgres; unloaded, it raised nothing
    # (and an embedded SQLite process does not pay for importing it).
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


def _postgres_error_kind(error) -> type[LcmqError]:
    import psycopg

    state = error.sqlstate
    if state is None:  # raised on the client side: no server answer (lost connection), or psycopg's own check
        if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
            return DatabaseError
        if isinstance(error, (psycopg.IntegrityError, psycopg.DataError)):
            return RecordError
        return QueryError
    if state == UNDEFINED_TABLE:
        return SchemaError
    if state in TRANSIENT_SQLSTATES or state.startswith(TRANSIENT_SQLSTATE_CLASSES):
        return DatabaseError
    if state.startswith(REFUSED_DATA_SQLSTATE_CLASSES):
        return RecordError
    return QueryError


def _sqlite_error_kind(error: sqlite3.Error) -> type[LcmqError]:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in SQLITE_RETRYABLE:
        return DatabaseError
    if isinstance(error, (sqlite3.IntegrityError, sqlite3.DataError)):
        return RecordError
    return QueryError  # SQLITE_ERROR: a missing table too (Repository checks the schema then)


def _translate_errors(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # classified by its class and code below; anything else re-raised
            kind = database_error_kind(exc)
            if kind is None:
                raise
            if kind is QueryError and self.schema_is_behind():
                kind = SchemaError
            raise self.translated_error(kind, exc, method.__name__) from exc

    return wrapper


def _take(
    conn: Connection, job_ids: Sequence[str], free: ColumnElement[bool], worker: str, lease_s: float, now: datetime
) -> list[JobRecord]:
    """The one conditional UPDATE … RETURNING that gives `worker` the jobs of `job_ids` that are
    `free` (Celery's claim by message ids and the gateway's claim by profile both end here): two
    workers never both own a job, and each claim uses one attempt."""
    return _job_records(
        conn.execute(
            update(JOBS_TABLE)
            .where(JOBS_TABLE.c.id.in_(list(job_ids)), free)
            .values(
                state=JobState.running.value,
                attempts=JOBS_TABLE.c.attempts + 1,
                worker=worker,
                lease_until=now + timedelta(seconds=lease_s),
                started_at=now,
            )
            .returning(*_JOB_RECORD_COLUMNS)
        )
    )


# record_successes' values per image, as the columns of a VALUES list (Postgres).
_SUCCESS_VALUES = (
    ("b_id", String()),
    ("b_key", JOBS_TABLE.c.key.type),
    ("b_sha256", JOBS_TABLE.c.sha256.type),
    ("b_render_ms", JOBS_TABLE.c.render_ms.type),
    ("b_batch_size", JOBS_TABLE.c.batch_size.type),
    ("b_warning", JOBS_TABLE.c.warning.type),
    ("b_control", JOBS_TABLE.c.control.type),
)


def _record_successes_at_once(rows: list[dict[str, Any]], worker: str, now: datetime):
    """The UPDATE of Repository.record_successes as one statement: the images' values joined as
    a VALUES list, each cast to its column's type (a column of NULLs has none of its own)."""
    images = sa_values(*(sa_column(name, type_) for name, type_ in _SUCCESS_VALUES), name="image").data(
        [tuple(row[name] for name, _ in _SUCCESS_VALUES) for row in rows]
    )
    got = images.c
    return (
        update(JOBS_TABLE)
        .where(
            JOBS_TABLE.c.id == got.b_id,
            JOBS_TABLE.c.state == JobState.running.value,
            JOBS_TABLE.c.worker == worker,
        )
        .values(
            state=JobState.succeeded.value,
            key=got.b_key,
            sha256=got.b_sha256,
            render_ms=cast(got.b_render_ms, JOBS_TABLE.c.render_ms.type),
            batch_size=cast(got.b_batch_size, JOBS_TABLE.c.batch_size.type),
            warning=got.b_warning,
            control=cast(got.b_control, JOBS_TABLE.c.control.type),
            finished_at=now,
            lease_until=None,
            error=None,
        )
    )


@dataclass(frozen=True)
class HandBack:
    """What handing jobs back did: those back in the queue (the caller publishes them after a
    backoff) and those failed for having been handed back too often."""

    requeued: list[str]
    failed: list[str]
    handbacks: int  # the most hand-backs among the requeued jobs, this one included: keys the backoff


class Repository:
    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def keeps_counts(self) -> bool:
        """Whether the database keeps each batch's jobs per state in batch_counts (Postgres:
        triggers, migration 0013), so a count costs a row per batch; else they are counted."""
        return self.engine.dialect.name == "postgresql"

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    def schema_is_behind(self) -> bool:
        """Whether a table or column of lcmq.models is missing in the database: a statement that
        failed for naming one means `lcmq db upgrade` was not run, not a bug (SQLite's result
        code does not tell a missing table from other errors)."""
        try:
            found = sa_inspect(self.engine)
            tables = set(found.get_table_names())
            for table in Base.metadata.sorted_tables:
                if table.name not in tables:
                    return True
                if set(table.columns.keys()) - {column["name"] for column in found.get_columns(table.name)}:
                    return True
            return False
        except Exception:  # noqa: BLE001 - cannot tell (the database is away): the first error stands
            return False

    def translated_error(self, kind: type[LcmqError], exc: BaseException, where: str) -> LcmqError:
        driver = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        if kind is SchemaError:
            return SchemaError(
                f"the database has no lcmq schema or an old one: run `lcmq db upgrade` ({self.safe_url})"
            )
        if kind is RecordError:  # the data itself was refused: retrying the same write cannot help
            return RecordError(f"database refused the data in {where}: {driver}")
        if kind is QueryError:
            return QueryError(f"database refused the statement in {where}: {driver}")
        return kind(f"database error in {where}: {driver}")

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- producer side --------------------------------------------------------------------

    @staticmethod
    def _dialect_insert(s: Session, table):
        if s.get_bind().dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as postgresql_insert

            return postgresql_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def _insert_batch(self, s: Session, batch: dict[str, Any]) -> bool:
        """Insert the batch row; False when its idempotency key already names another batch."""
        statement = self._dialect_insert(s, Batch).values(**batch)
        if batch.get("idempotency_key"):
            # Concurrent submits of the same thing: the unique key makes the second wait for the
            # first's commit and then insert nothing.
            statement = statement.on_conflict_do_nothing(index_elements=["idempotency_key"])
        return s.execute(statement.returning(Batch.id)).first() is not None

    @_translate_errors
    def create_batch(
        self,
        batch: dict[str, Any],
        jobs: Iterable[dict[str, Any]],
        page: int = 5000,
        before_commit: Callable[[], None] | None = None,
    ) -> tuple[str, bool]:
        """The batch and all its jobs in one transaction: all of them exist, or none.

        Returns (batch id, created). With an idempotency key that is already taken, nothing is
        written (`jobs` is not read) and the existing batch's id comes back with created=False.
        `before_commit` runs once every job is written, in the transaction: if it raises,
        nothing is committed.
        """
        now = utcnow()
        with self._session() as s:
            if not self._insert_batch(s, batch | {"created_at": now}):
                existing = s.scalar(select(Batch.id).where(Batch.idempotency_key == batch["idempotency_key"]))
                assert existing is not None  # the insert conflicted on this key, so its row exists
                return existing, False
            self._write_jobs(s, batch["id"], jobs, now, page)
            if before_commit is not None:
                before_commit()
        return batch["id"], True

    def _write_jobs(
        self, s: Session, batch_id: str, jobs: Iterable[dict[str, Any]], now: datetime, page: int = 5000
    ) -> int:
        # dispatched_at = now: the batch's publish covers every job (see mark_published).
        batch_values = {"batch_id": batch_id, "created_at": now, "dispatched_at": now}
        if s.get_bind().dialect.name == "postgresql":
            total = _copy_jobs(s, jobs, batch_values)
        else:
            total = _insert_jobs(s, jobs, batch_values, page)
        s.execute(update(Batch).where(Batch.id == batch_id).values(total=total))
        return total

    def _get(self, model, key: str, record_cls, what: str):
        """One row by primary key as a record; NotFoundError names what is missing."""
        with self._session() as s:
            row = s.get(model, key)
            if row is None:
                raise NotFoundError(f"no {what} {key!r}")
            return _record(record_cls, row)

    @_translate_errors
    def get_batch(self, batch_id: str) -> BatchRecord:
        return self._get(Batch, batch_id, BatchRecord, "batch")

    @_translate_errors
    def ping(self) -> None:
        """One trivial statement: the database answers (`GET /readyz`)."""
        with self._session() as s:
            s.execute(select(1))

    @_translate_errors
    def state_counts(self, batch_id: str) -> dict[str, int]:
        """The batch's jobs per state: its batch_counts row on Postgres (kept by triggers, so a
        10^6-job batch costs one row), a count of its jobs on SQLite."""
        with self._session() as s:
            return self._counts_of(s, [batch_id])[batch_id]

    @_translate_errors
    def recount_states(self, batch_id: str) -> dict[str, int]:
        """The batch's jobs per state counted from the jobs themselves, whatever the database:
        what the counters of `state_counts` must equal (the tests compare them)."""
        with self._session() as s:
            return self._counted(s, [batch_id])[batch_id]

    @_translate_errors
    def recent_batches(
        self,
        limit: int = 20,
        *,
        owner: str | None | AnyOwner = ANY_OWNER,
        before: tuple[datetime, str] | None = None,
    ) -> list[tuple[BatchRecord, dict[str, int]]]:
        """Newest first, with their state counts. `owner`: only that key's batches (None: the
        CLI's); `before` = (created_at, id) of the last batch of the previous page (keyset)."""
        query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
        if not isinstance(owner, AnyOwner):
            query = query.where(Batch.owner.is_(None) if owner is None else Batch.owner == owner)
        if before is not None:
            created_at, batch_id = before
            query = query.where(
                or_(Batch.created_at < created_at, and_(Batch.created_at == created_at, Batch.id < batch_id))
            )
        with self._session() as s:
            batches = [_record(BatchRecord, b) for b in s.scalars(query)]
            if not batches:
                return []
            counts = self._counts_of(s, [b.id for b in batches])
            return [(b, counts[b.id]) for b in batches]

    @_translate_errors
    def jobs_page(self, batch_id: str, state: JobState | None, after_index: int, limit: int) -> list[JobRecord]:
        """Up to `limit` jobs after row `after_index`, in row order (keyset pagination)."""
        query = select(Job).where(Job.batch_id == batch_id, Job.index > after_index).order_by(Job.index).limit(limit)
        if state is not None:
            query = query.where(Job.state == state.value)
        with self._session() as s:
            return [_record(JobRecord, j) for j in s.scalars(query)]

    def iter_jobs(self, batch_id: str, state: JobState | None, page: int = 5000) -> Iterator[JobRecord]:
        """A batch's jobs (all, or in one state), in row order, a page at a time (keyset pagination): a
        10^6-job manifest or export never holds the batch, nor a session, for long."""
        after = -1
        while True:
            rows = self.jobs_page(batch_id, state, after, page)
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].index

    @_translate_errors
    def jobs(self, batch_id: str, state: JobState | None = None) -> list[JobRecord]:
        with self._session() as s:
            query = select(Job).where(Job.batch_id == batch_id).order_by(Job.index)
            if state is not None:
                query = query.where(Job.state == state.value)
            return [_record(JobRecord, j) for j in s.scalars(query)]

    # --- dispatch (the outbox) ------------------------------------------------------------

    @_translate_errors
    def pending_dispatch(
        self, *, batch_id: str | None = None, dispatched_before: datetime | None = None, limit: int = 10_000
    ) -> list[PendingJob]:
        """Queued jobs with no message yet (or, with dispatched_before, whose message is presumed lost)."""
        query = select(
            Job.id,
            Job.batch_id,
            Job.width,
            Job.height,
            Job.steps,
            Job.guidance,
            Job.loras,
            Job.strength,
            Job.control,
            Job.attempts,
        ).where(Job.state == JobState.queued.value)
        if dispatched_before is not None:
            query = query.where(Job.dispatched_at < dispatched_before)
        else:
            query = query.where(Job.dispatched_at.is_(None))
        if batch_id is not None:
            query = query.where(Job.batch_id == batch_id)
        # (JSON has no ordering in Postgres: a page's LoRA sets are grouped by chunk_pending.)
        query = query.order_by(
            Job.batch_id, Job.width, Job.height, Job.steps, Job.guidance, Job.strength, Job.index
        ).limit(limit)
        with self._session() as s:
            return [PendingJob(r.id, r.batch_id, _shape(r), r.attempts) for r in s.execute(query)]

    @_translate_errors
    def queued_jobs(self, batch_id: str, after_index: int = -1, limit: int = 10_000) -> list[tuple[int, PendingJob]]:
        """A page of a batch's queued jobs in row order, with their index (keyset pagination)."""
        query = (
            select(
                Job.index,
                Job.id,
                Job.batch_id,
                Job.width,
                Job.height,
                Job.steps,
                Job.guidance,
                Job.loras,
                Job.strength,
                Job.control,
                Job.attempts,
            )
            .where(Job.batch_id == batch_id, Job.state == JobState.queued.value, Job.index > after_index)
            .order_by(Job.index)
            .limit(limit)
        )
        with self._session() as s:
            return [
                (r._mapping["index"], PendingJob(r.id, r.batch_id, _shape(r), r.attempts)) for r in s.execute(query)
            ]  # _mapping: a Row's `index` is also tuple.index

    @_translate_errors
    def mark_published(self, batch_id: str) -> None:
        with self._session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(published_at=utcnow()))

    @_translate_errors
    def unpublished_batches(self, created_before: datetime) -> list[str]:
        with self._session() as s:
            return list(
                s.scalars(select(Batch.id).where(Batch.published_at.is_(None), Batch.created_at < created_before))
            )

    @_translate_errors
    def mark_dispatched(self, job_ids: Sequence[str]) -> None:
        now = utcnow()
        with self._session() as s:
            if s.get_bind().dialect.name == "postgresql":  # one array parameter, not 10^4 bound values
                s.execute(
                    text("UPDATE jobs SET dispatched_at = :now WHERE id = ANY(:ids)"),
                    {"now": now, "ids": list(job_ids)},
                )
                return
            for start in range(0, len(job_ids), 500):
                s.execute(
                    update(Job)
                    .where(Job.id.in_(list(job_ids[start : start + 500])))
                    .values(dispatched_at=now)
                    .execution_options(synchronize_session=False)
                )

    @_translate_errors
    def recover_expired(self, max_attempts: int) -> tuple[int, int]:
        """Running jobs whose lease expired (their worker is gone): requeue, or fail at the limit.

        Returns (requeued, failed). Requeued jobs have no message yet: dispatch sends them.
        """
        now = utcnow()
        table = JOBS_TABLE
        spent = table.c.attempts >= max_attempts
        lost = "worker lost during attempt " + cast(table.c.attempts, String)
        # One statement for both outcomes (as `release`): on Postgres the counters' trigger then
        # locks the batches' counter rows once, at its end. Two statements would hold them from
        # the first while the second waits for job rows that a claim in flight has locked and
        # whose trigger then waits for those counters: a deadlock.
        statement = (
            update(table)
            .where(table.c.state == JobState.running.value, table.c.lease_until < now)
            .values(
                state=case((spent, JobState.failed.value), else_=JobState.queued.value),
                finished_at=case((spent, now), else_=table.c.finished_at),
                dispatched_at=case((spent, table.c.dispatched_at), else_=None),
                lease_until=None,
                error=case(
                    (spent, func.coalesce(table.c.error + "; ", "") + lost + f" of {max_attempts}; giving up"),
                    else_=lost,
                ),
            )
            .returning(table.c.state)
        )
        with self.engine.begin() as conn:
            states = conn.execute(statement).scalars().all()
        failed = sum(state == JobState.failed.value for state in states)
        return len(states) - failed, failed

    # --- control --------------------------------------------------------------------------

    @_translate_errors
    def cancel_batch(self, batch_id: str) -> int:
        """Queued jobs become canceled now. Workers claim one micro-batch at a time, so a running
        chunk renders the micro-batch it holds and finds the rest canceled."""
        now = utcnow()
        with self._session() as s:
            if _rowcount(s.execute(update(Batch).where(Batch.id == batch_id).values(canceled_at=now))) == 0:
                raise NotFoundError(f"no batch {batch_id!r}")
            return _rowcount(
                s.execute(
                    update(Job)
                    .where(Job.batch_id == batch_id, Job.state == JobState.queued.value)
                    .values(state=JobState.canceled.value, finished_at=now)
                    .execution_options(synchronize_session=False)
                )
            )

    @_translate_errors
    def requeue(self, batch_id: str, states: Sequence[JobState], reset_attempts: bool = False) -> int:
        """Put a batch's jobs in the given states back in the queue (resume, retry)."""
        values: dict[str, Any] = {
            "state": JobState.queued.value,
            "dispatched_at": None,
            "lease_until": None,
            "finished_at": None,
        }
        if reset_attempts:
            values |= {"attempts": 0, "handbacks": 0, "error": None}
        now = utcnow()
        wanted = [st.value for st in states if st != JobState.running]
        condition: ColumnElement[bool] = Job.state.in_(wanted)
        if JobState.running in states:  # running only when its lease expired: never steal a live job
            condition = condition | ((Job.state == JobState.running.value) & (Job.lease_until < now))
        with self._session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(canceled_at=None))
            requeued = _rowcount(
                s.execute(
                    update(Job)
                    .where(Job.batch_id == batch_id, condition)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
            )
            if requeued:  # its manifest.jsonl is due again once these jobs are final
                s.execute(update(Batch).where(Batch.id == batch_id).values(manifest_at=None))
            return requeued

    # --- schedules (catalogs rendered on a cron schedule) ------------------------------------

    @_translate_errors
    def add_schedule(self, schedule: dict[str, Any]) -> bool:
        """Insert a schedule; False when one of that name exists (nothing is changed then)."""
        with self._session() as s:
            statement = self._dialect_insert(s, Schedule).values(**schedule, created_at=utcnow())
            statement = statement.on_conflict_do_nothing(index_elements=["name"]).returning(Schedule.name)
            return s.execute(statement).first() is not None

    @_translate_errors
    def get_schedule(self, name: str) -> ScheduleRecord:
        return self._get(Schedule, name, ScheduleRecord, "schedule")

    @_translate_errors
    def schedules(self) -> list[ScheduleRecord]:
        with self._session() as s:
            return [_record(ScheduleRecord, row) for row in s.scalars(select(Schedule).order_by(Schedule.name))]

    @_translate_errors
    def due_schedules(self, now: datetime) -> list[ScheduleRecord]:
        with self._session() as s:
            query = (
                select(Schedule)
                .where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
                .order_by(Schedule.next_run_at)
            )
            return [_record(ScheduleRecord, row) for row in s.scalars(query)]

    @_translate_errors
    def update_schedule(self, name: str, **values: Any) -> None:
        """Pause, resume, or move next_run_at (tests make a schedule due this way)."""
        with self._session() as s:
            if _rowcount(s.execute(update(Schedule).where(Schedule.name == name).values(**values))) == 0:
                raise NotFoundError(f"no schedule {name!r}")

    @_translate_errors
    def delete_schedule(self, name: str) -> None:
        """The schedule and its catalog state; its batches and images stay."""
        with self._session() as s:
            s.execute(delete(CatalogItem).where(CatalogItem.schedule_name == name))
            if _rowcount(s.execute(delete(Schedule).where(Schedule.name == name))) == 0:
                raise NotFoundError(f"no schedule {name!r}")

    @_translate_errors
    def catalog_state(self, name: str) -> dict[str, ItemState]:
        """Every item the catalog ever had, with its last render key and that job's state."""
        query = (
            select(CatalogItem.item_id, CatalogItem.render_key, CatalogItem.removed_at, Job.state)
            .outerjoin(Job, Job.id == CatalogItem.job_id)
            .where(CatalogItem.schedule_name == name)
        )
        with self._session() as s:
            return {r.item_id: ItemState(r.render_key, r.state, r.removed_at is not None) for r in s.execute(query)}

    @_translate_errors
    def catalog_counts(self, name: str) -> dict[str, int]:
        query = (
            select(CatalogItem.removed_at.is_(None), func.count())
            .where(CatalogItem.schedule_name == name)
            .group_by(CatalogItem.removed_at.is_(None))
        )
        with self._session() as s:
            counts = {bool(active): n for active, n in s.execute(query)}
        return {"active": counts.get(True, 0), "removed": counts.get(False, 0)}

    def _schedule_cas(self, s: Session, name: str, seen_version: int, values: dict[str, Any]) -> bool:
        """Advance the schedule only if no run committed since `seen_version` was read. On Postgres
        the row lock makes a concurrent run wait and then find the version moved; on SQLite the
        write lock serializes the transactions the same way."""
        statement = (
            update(Schedule)
            .where(Schedule.name == name, Schedule.version == seen_version)
            .values(version=seen_version + 1, **values)
        )
        return _rowcount(s.execute(statement)) == 1

    @_translate_errors
    def record_catalog_run(
        self,
        name: str,
        seen_version: int,
        batch: dict[str, Any] | None,
        jobs: list[dict[str, Any]],
        rendered: list[dict[str, Any]],
        kept: list[str],
        removed: list[str],
        counts: dict[str, int],
        next_run_at: datetime | None = None,
    ) -> bool:
        """One catalog run in one transaction: advance the schedule (compare-and-set on its
        version), write the batch and its jobs, and the catalog's new state. False, and nothing
        written, when another run committed first: its diff is stale, so exactly one run wins.
        `batch` None: nothing new or changed, so no batch is written and last_batch_id stays.

        `rendered`: {item_id, render_key, job_id} of the new and changed items; `kept`: unchanged
        items (back in the catalog if they had been removed); `removed`: items gone from it.
        """
        now = utcnow()
        values: dict[str, Any] = {"last_run_at": now, "last_counts": counts, "last_error": None}
        if batch is not None:
            values["last_batch_id"] = batch["id"]
        if next_run_at is not None:
            values["next_run_at"] = next_run_at
        with self._session() as s:
            if not self._schedule_cas(s, name, seen_version, values):
                return False
            if batch is not None:
                s.execute(insert(Batch).values(**batch, created_at=now))
                self._write_jobs(s, batch["id"], jobs, now)
            if rendered:
                statement = self._dialect_insert(s, CatalogItem)
                statement = statement.on_conflict_do_update(
                    index_elements=["schedule_name", "item_id"],
                    set_={
                        "render_key": statement.excluded.render_key,
                        "job_id": statement.excluded.job_id,
                        "removed_at": None,
                        "updated_at": now,
                    },
                )
                s.execute(
                    statement,
                    [item | {"schedule_name": name, "removed_at": None, "updated_at": now} for item in rendered],
                )
            # Unchanged items that had been removed are back; removed ones are marked (once).
            for ids, removed_at in ((kept, None), (removed, now)):
                flip = CatalogItem.removed_at.is_(None) if removed_at else CatalogItem.removed_at.is_not(None)
                for start in range(0, len(ids), 500):
                    s.execute(
                        update(CatalogItem)
                        .where(
                            CatalogItem.schedule_name == name, flip, CatalogItem.item_id.in_(ids[start : start + 500])
                        )
                        .values(removed_at=removed_at, updated_at=now)
                        .execution_options(synchronize_session=False)
                    )
        return True

    @_translate_errors
    def record_schedule_error(self, name: str, seen_version: int, error: str, next_run_at: datetime | None) -> bool:
        """A scheduled run that could not write (a bad catalog): keep why, and move on to the next
        fire time so a broken catalog is not retried every tick. Same compare-and-set as a run."""
        values: dict[str, Any] = {"last_error": error[:4000]}
        if next_run_at is not None:
            values["next_run_at"] = next_run_at
        with self._session() as s:
            return self._schedule_cas(s, name, seen_version, values)

    # --- worker side ----------------------------------------------------------------------

    @_translate_errors
    def claim(
        self, job_ids: Sequence[str], worker: str, lease_s: float, max_attempts: int | None = None
    ) -> list[JobRecord]:
        """Take the jobs that are free: queued, or running under a lease that expired.

        A conditional update, so two workers handed the same ids never both own a job. With
        max_attempts, an expired job that already used them all is not taken: it is the
        sweeper's to fail (a redelivered message must not give a poison job one more worker).
        """
        now = utcnow()
        expired = (Job.state == JobState.running.value) & (Job.lease_until < now)
        if max_attempts is not None:
            expired = expired & (Job.attempts < max_attempts)
        claimable = or_(Job.state == JobState.queued.value, expired)
        with self.engine.begin() as conn:  # Core: plain rows back, no ORM objects
            claimed = _take(conn, job_ids, claimable, worker, lease_s, now)
        return sorted(claimed, key=lambda j: j.index)

    @_translate_errors
    def claim_next(
        self,
        profile: str,
        max_jobs: int,
        worker: str,
        lease_s: float,
        max_attempts: int,
        *,
        token: str | None = None,
    ) -> list[JobRecord]:
        """Take up to `max_jobs` free jobs of a profile for a worker that pulls (the edge
        gateway): the most urgent batch first, then the oldest jobs, with `Repository.claim`'s
        lease and attempts rule, so Celery workers and pulling workers share one queue (a message
        for a job taken here finds it taken: its claim is a no-op).

        Candidates are picked `FOR UPDATE SKIP LOCKED` (Postgres), then taken with one conditional
        UPDATE in the same transaction: two gateways never wait on, nor take, each other's rows.
        Jobs naming a file of the API's machine (an init image or LoRA given on the CLI) are left
        to Celery workers: nothing can presign a local file. With `token`, nothing is claimed
        unless that worker token is valid and not paused, checked under a share lock on its row in
        the same transaction, so a revocation (which updates the row, then releases the token's
        jobs) is never overtaken by a claim.
        """
        now = utcnow()
        table = JOBS_TABLE
        candidate = table.alias("candidate")
        expired = (candidate.c.state == JobState.running.value) & (candidate.c.lease_until < now)
        expired = expired & (candidate.c.attempts < max_attempts)
        # Stored init images are s3:// or file:// URLs; stored LoRA paths s3:// URLs or absolute
        # local paths (lcmq.loras, serialised with json.dumps' default separators).
        lora_paths = cast(candidate.c.loras, String)
        picked = (
            select(candidate.c.id)
            .join(Batch, Batch.id == candidate.c.batch_id)
            .where(
                Batch.profile == profile,
                or_(candidate.c.state == JobState.queued.value, expired),
                or_(candidate.c.init_image.is_(None), candidate.c.init_image.like("s3://%")),
                # Conditioned jobs stay with Celery workers: the claim does not carry control
                # images to edge workers yet (docs/edge.md).
                candidate.c.control.is_(None),
                or_(
                    candidate.c.loras.is_(None),
                    ~lora_paths.like('%"path": "/%') & ~lora_paths.like('%"path": "file:%'),
                ),
            )
            .order_by(Batch.priority.desc(), candidate.c.created_at, candidate.c.index)
            .limit(max_jobs)
            .with_for_update(of=candidate, skip_locked=True)
        )
        still_free = or_(
            table.c.state == JobState.queued.value,
            (table.c.state == JobState.running.value) & (table.c.lease_until < now) & (table.c.attempts < max_attempts),
        )
        with self.engine.begin() as conn:
            if token is not None:
                valid = conn.execute(
                    select(WorkerToken.name)
                    .where(WorkerToken.name == token, WorkerToken.revoked_at.is_(None), WorkerToken.paused_at.is_(None))
                    .with_for_update(read=True)
                ).first()
                if valid is None:
                    return []
            order = {job_id: place for place, job_id in enumerate(conn.scalars(picked))}
            if not order:
                return []
            claimed = _take(conn, list(order), still_free, worker, lease_s, now)
            if token is not None and claimed:  # the last claim that got work (polls write nothing)
                conn.execute(update(WorkerToken).where(WorkerToken.name == token).values(last_claim_at=now))
        return sorted(claimed, key=lambda j: order[j.id])

    @_translate_errors
    def jobs_by_id(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The rows of these jobs (those that exist), in no order."""
        if not job_ids:
            return []
        with self.engine.connect() as conn:
            return _job_records(conn.execute(select(*_JOB_RECORD_COLUMNS).where(Job.id.in_(list(job_ids)))))

    def _held(self, job_ids: Sequence[str], worker: str):
        return Job.id.in_(list(job_ids)) & (Job.state == JobState.running.value) & (Job.worker == worker)

    @_translate_errors
    def extend_leases(self, job_ids: Sequence[str], worker: str, lease_s: float) -> int:
        with self._session() as s:
            return _rowcount(
                s.execute(
                    update(Job)
                    .where(self._held(job_ids, worker))
                    .values(lease_until=utcnow() + timedelta(seconds=lease_s))
                    .execution_options(synchronize_session=False)
                )
            )

    @_translate_errors
    def record_successes(self, results: Sequence[StoredImage], worker: str) -> int:
        """Mark jobs done, one round trip for a micro-batch; only those this worker still holds.

        Returns how many were recorded: fewer than given means some leases were lost (another
        worker owns those jobs now, and its record will stand).
        """
        if not results:
            return 0
        now = utcnow()
        rows = [
            {
                "b_id": r.job_id,
                "b_key": r.key,
                "b_sha256": r.sha256,
                "b_render_ms": r.render_ms,
                "b_batch_size": r.batch_size,
                "b_warning": r.warning,
                "b_control": r.control,
            }
            for r in results
        ]
        statement = (
            update(Job)
            .where(Job.id == bindparam("b_id"), Job.state == JobState.running.value, Job.worker == worker)
            .values(
                state=JobState.succeeded.value,
                key=bindparam("b_key"),
                sha256=bindparam("b_sha256"),
                render_ms=bindparam("b_render_ms"),
                batch_size=bindparam("b_batch_size"),
                warning=bindparam("b_warning"),
                control=bindparam("b_control", type_=Job.__table__.c.control.type),
                finished_at=now,
                lease_until=None,
                error=None,
            )
            .execution_options(synchronize_session=False)
        )
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # One UPDATE … FROM VALUES for the micro-batch: one statement, so the counters'
                # trigger (migration 0013) writes once per micro-batch, not once per image.
                return _rowcount(conn.execute(_record_successes_at_once(rows, worker, now)))
            return _rowcount(conn.execute(statement, rows))  # Core executemany

    def record_success(
        self,
        job_id: str,
        worker: str,
        key: str,
        sha256: str,
        render_ms: float,
        batch_size: int,
        warning: str | None = None,
    ) -> bool:
        """Mark one job done if this worker still holds it; False when the lease was lost."""
        return self.record_successes([StoredImage(job_id, key, sha256, render_ms, batch_size, warning)], worker) == 1

    @_translate_errors
    def record_failure(self, job_ids: Sequence[str], worker: str, error: str) -> int:
        with self._session() as s:
            return _rowcount(
                s.execute(
                    update(Job)
                    .where(self._held(job_ids, worker))
                    .values(state=JobState.failed.value, error=error[:4000], finished_at=utcnow(), lease_until=None)
                    .execution_options(synchronize_session=False)
                )
            )

    @_translate_errors
    def release(
        self,
        job_ids: Sequence[str],
        worker: str,
        error: str | None,
        *,
        max_handbacks: int,
        publish_later: bool = False,
    ) -> HandBack:
        """Hand jobs back to the queue after a transient fault, or fail those handed back
        `max_handbacks` times already, with the fault as the reason: one conditional update.

        A hand-back does not count an attempt (attempts - 1): max_attempts bounds the workers a
        job takes down, not the outages of S3 or the database; `handbacks` bounds those, so a
        fault that only looks passing (a bug) cannot loop. The caller publishes a message for
        the requeued jobs (a task retry, or a new chunk) after a backoff, hence dispatched_at;
        with `publish_later` (a caller with no broker: the edge gateway) they are left without a
        message, which the sweeper sends (dispatched_at NULL).
        """
        now = utcnow()
        table = JOBS_TABLE
        spent = table.c.handbacks >= max_handbacks  # this hand-back would pass the cap
        gave_up = f"{error or 'handed back'}; handed back {max_handbacks} times, giving up"
        statement = (
            update(table)
            .where(self._held(job_ids, worker))
            .values(
                state=case((spent, JobState.failed.value), else_=JobState.queued.value),
                error=case((spent, gave_up), else_=error),
                finished_at=case((spent, now), else_=None),
                attempts=case((spent, table.c.attempts), else_=table.c.attempts - 1),
                handbacks=case((spent, table.c.handbacks), else_=table.c.handbacks + 1),
                dispatched_at=case((spent, table.c.dispatched_at), else_=None if publish_later else now),
                lease_until=None,
            )
            .returning(table.c.id, table.c.state, table.c.handbacks)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(statement).all()
        requeued = [row for row in rows if row.state == JobState.queued.value]
        return HandBack(
            requeued=[row.id for row in requeued],
            failed=[row.id for row in rows if row.state == JobState.failed.value],
            handbacks=max((row.handbacks for row in requeued), default=0),
        )

    # --- manifests ------------------------------------------------------------------------
    # batches.manifest_at holds the latest job finish that the batch's manifest.jsonl covers, and
    # NULL while one is due: never written, or jobs were requeued (requeue resets it) since.

    def _manifest_version(self, s: Session, batch_id: str) -> datetime | None:
        unfinished = s.scalar(
            select(Job.id)
            .where(Job.batch_id == batch_id, Job.state.in_([JobState.queued.value, JobState.running.value]))
            .limit(1)
        )
        if unfinished is not None:
            return None
        return _aware(s.scalar(select(func.max(Job.finished_at)).where(Job.batch_id == batch_id)))

    @_translate_errors
    def manifest_version(self, batch_id: str) -> datetime | None:
        """None while the batch has queued or running jobs; else its latest job finish, which
        names the set of final rows a manifest written now covers."""
        with self._session() as s:
            return self._manifest_version(s, batch_id)

    @_translate_errors
    def mark_manifest_written(self, batch_id: str, version: datetime) -> bool:
        """Record that the manifest of `version` is in storage, if that is still the batch's
        current version. False: the batch changed while the manifest was written (a retry
        requeued jobs, or they finished again); the caller writes it again or leaves it due.
        """
        with self._session() as s:
            # The batch row's lock orders this against requeue (which updates the row first).
            s.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
            if self._manifest_version(s, batch_id) != version:
                return False
            s.execute(update(Batch).where(Batch.id == batch_id).values(manifest_at=version))
            return True

    @_translate_errors
    def finished_batches_needing_manifest(self, finished_before: datetime, limit: int = 20) -> list[str]:
        """Batches due a manifest: none recorded, no queued or running job, and no job final
        after `finished_before` (the worker that finished it writes it; this is for when it died).
        Oldest first. The subqueries use the (batch_id, state, dispatched_at) index."""
        unfinished = select(Job.id).where(
            Job.batch_id == Batch.id, Job.state.in_([JobState.queued.value, JobState.running.value])
        )
        recent = select(Job.id).where(Job.batch_id == Batch.id, Job.finished_at >= finished_before)
        query = (
            select(Batch.id)
            .where(Batch.manifest_at.is_(None), ~unfinished.exists(), ~recent.exists())
            .order_by(Batch.created_at)
            .limit(limit)
        )
        with self._session() as s:
            return list(s.scalars(query))

    # --- API keys (lcmq.access) -------------------------------------------------------------

    @_translate_errors
    def add_api_key(
        self, name: str, key_sha256: str, webhook_secret: str, admin: bool, expires_at: datetime | None = None
    ) -> bool:
        """Insert a key; False when a key of that name exists (revoked ones too: names are not reused)."""
        with self._session() as s:
            statement = self._dialect_insert(s, ApiKey).values(
                name=name,
                key_sha256=key_sha256,
                webhook_secret=webhook_secret,
                admin=admin,
                created_at=utcnow(),
                expires_at=expires_at,
            )
            statement = statement.on_conflict_do_nothing(index_elements=["name"]).returning(ApiKey.name)
            return s.execute(statement).first() is not None

    @_translate_errors
    def api_key_by_hash(self, key_sha256: str) -> ApiKeyRecord | None:
        """The valid (not revoked) key with this hash. Read on every request, so a revocation
        made by any process holds from the next request on."""
        with self._session() as s:
            row = s.scalars(
                select(ApiKey).where(
                    ApiKey.key_sha256 == key_sha256,
                    ApiKey.revoked_at.is_(None),
                    or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()),
                )
            ).first()
            return None if row is None else _record(ApiKeyRecord, row)

    @_translate_errors
    def api_keys(self) -> list[ApiKeyRecord]:
        with self._session() as s:
            return [_record(ApiKeyRecord, row) for row in s.scalars(select(ApiKey).order_by(ApiKey.name))]

    @_translate_errors
    def revoke_api_key(self, name: str) -> bool:
        """False when no valid key has that name."""
        with self._session() as s:
            result = s.execute(
                update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
            )
            return _rowcount(result) == 1

    @_translate_errors
    def webhook_secret(self, name: str) -> str | None:
        with self._session() as s:
            return s.scalar(select(ApiKey.webhook_secret).where(ApiKey.name == name))

    # --- worker tokens (lcmq.workertokens; the edge gateway, lcmq/http/gateway.py) -------------

    @_translate_errors
    def add_worker_token(self, name: str, token_sha256: str, profiles: list[str], cost_per_hour: float | None) -> bool:
        """Insert a token; False when a token of that name exists (revoked ones too: names are
        not reused, so an old worker string never names a new token's jobs)."""
        with self._session() as s:
            statement = self._dialect_insert(s, WorkerToken).values(
                name=name,
                token_sha256=token_sha256,
                profiles=profiles,
                cost_per_hour=cost_per_hour,
                created_at=utcnow(),
                failures_in_a_row=0,
            )
            statement = statement.on_conflict_do_nothing(index_elements=["name"]).returning(WorkerToken.name)
            return s.execute(statement).first() is not None

    @_translate_errors
    def worker_token_by_hash(self, token_sha256: str) -> WorkerTokenRecord | None:
        """The valid (not revoked) token with this hash; read on every gateway request."""
        with self._session() as s:
            row = s.scalars(
                select(WorkerToken).where(WorkerToken.token_sha256 == token_sha256, WorkerToken.revoked_at.is_(None))
            ).first()
            return None if row is None else _record(WorkerTokenRecord, row)

    @_translate_errors
    def worker_tokens(self) -> list[WorkerTokenRecord]:
        with self._session() as s:
            return [_record(WorkerTokenRecord, r) for r in s.scalars(select(WorkerToken).order_by(WorkerToken.name))]

    @_translate_errors
    def revoke_worker_token(self, name: str, worker_prefix: str) -> int | None:
        """Revoke a token and, in the same transaction, put every job running under
        `worker_prefix` (its edge workers' jobs) back in the queue at once, attempts unchanged and
        without a message (the sweeper sends one for Celery workers; pulling workers see them at
        their next claim). None when no valid token has that name; else the jobs released.
        The token row is updated first: a claim in flight holds a share lock on it, so the
        release runs after that claim's commit and takes its jobs back too."""
        with self._session() as s:
            revoked = s.execute(
                update(WorkerToken)
                .where(WorkerToken.name == name, WorkerToken.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            if _rowcount(revoked) != 1:
                return None
            return _rowcount(
                s.execute(
                    update(Job)
                    .where(Job.state == JobState.running.value, Job.worker.startswith(worker_prefix, autoescape=True))
                    .values(state=JobState.queued.value, lease_until=None, dispatched_at=None)
                    .execution_options(synchronize_session=False)
                )
            )

    @_translate_errors
    def resume_worker_token(self, name: str) -> bool:
        """Unpause a valid token (its failure count starts again at 0); False when none has that name."""
        with self._session() as s:
            statement = (
                update(WorkerToken)
                .where(WorkerToken.name == name, WorkerToken.revoked_at.is_(None))
                .values(paused_at=None, failures_in_a_row=0)
            )
            return _rowcount(s.execute(statement)) == 1

    @_translate_errors
    def count_token_failures(self, name: str, failed: int, pause_at: int) -> bool:
        """Add `failed` jobs to the token's failures in a row, pausing it once they reach
        `pause_at`; True when the token is paused now."""
        with self._session() as s:
            total = WorkerToken.failures_in_a_row + failed
            paused_at = s.execute(
                update(WorkerToken)
                .where(WorkerToken.name == name)
                .values(
                    failures_in_a_row=total,
                    paused_at=case(
                        (total >= pause_at, func.coalesce(WorkerToken.paused_at, utcnow())), else_=WorkerToken.paused_at
                    ),
                )
                .returning(WorkerToken.paused_at)
            ).scalar()
            return paused_at is not None

    @_translate_errors
    def reset_token_failures(self, name: str) -> None:
        """A recorded success ends a run of failures (a no-op write when there was none)."""
        with self._session() as s:
            s.execute(
                update(WorkerToken)
                .where(WorkerToken.name == name, WorkerToken.failures_in_a_row != 0)
                .values(failures_in_a_row=0)
            )

    # --- webhooks: the outbox of final-status calls (lcmq.webhooks, scheduler/webhooks.py) ----

    @_translate_errors
    def queue_final_webhooks(
        self, now: datetime, limit: int, *, retry_for_s: float, body_of: WebhookBody, new_id: Callable[[], str]
    ) -> list[str]:
        """Write the delivery of each batch that has a webhook, none queued yet, and no queued or
        running job; returns the new deliveries' ids. One transaction: the batches are taken by
        one conditional UPDATE (webhook_queued_at from NULL to `now`; Postgres skips rows another
        process holds), then their counts are read and their deliveries inserted, so a batch's
        webhook is queued once, with its body, or not at all. The unique (batch_id, event)
        holds that even against a second writer. The scan reads ix_batches_webhook_waiting (only
        batches still waiting for their webhook) and, per batch, the jobs' (batch_id, state, dispatched_at) index.
        """
        unfinished = select(Job.id).where(
            Job.batch_id == Batch.id, Job.state.in_([JobState.queued.value, JobState.running.value])
        )
        waiting = Batch.webhook_url.is_not(None) & Batch.webhook_queued_at.is_(None)
        due = (
            select(Batch.id)
            .where(waiting, ~unfinished.exists())
            .order_by(Batch.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)  # Postgres; SQLite serialises writers instead
        )
        table = _table_of(Batch)
        with self._session() as s:
            taken = s.execute(
                update(table).where(table.c.id.in_(due), waiting).values(webhook_queued_at=now).returning(*table.c)
            ).all()
            if not taken:
                return []
            batches = [_record(BatchRecord, row) for row in taken]
            counts = self._counts_of(s, [b.id for b in batches])
            rows = [
                {
                    "id": new_id(),
                    "batch_id": b.id,
                    "event": FINAL_EVENT,
                    "url": b.webhook_url,
                    "owner": b.owner,
                    "body": body_of(b, counts[b.id]),
                    "state": WEBHOOK_PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "give_up_at": now + timedelta(seconds=retry_for_s),
                    "created_at": now,
                }
                for b in batches
            ]
            statement = self._dialect_insert(s, WebhookDelivery).on_conflict_do_nothing(
                index_elements=["batch_id", "event"]
            )
            return list(s.scalars(statement.returning(WebhookDelivery.id), rows))

    @staticmethod
    def _counted(s: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        """Jobs per state of each batch, counted (the (batch_id, state, …) index answers it)."""
        counts: dict[str, dict[str, int]] = {b: {st.value: 0 for st in JobState} for b in batch_ids}
        rows = s.execute(
            select(Job.batch_id, Job.state, func.count())
            .where(Job.batch_id.in_(batch_ids))
            .group_by(Job.batch_id, Job.state)
        )
        for batch_id, state, n in rows:
            counts[batch_id][state] = n
        return counts

    @classmethod
    def _counts_of(cls, s: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        """Jobs per state of each batch: the triggers' counters on Postgres (migration 0013),
        counted on SQLite, which keeps none. A batch without a counter row has no job yet."""
        if s.get_bind().dialect.name != "postgresql":  # Repository.keeps_counts
            return cls._counted(s, batch_ids)
        counts: dict[str, dict[str, int]] = {b: {st.value: 0 for st in JobState} for b in batch_ids}
        columns = [getattr(BatchCount, st.value) for st in JobState]
        for batch_id, *ns in s.execute(select(BatchCount.batch_id, *columns).where(BatchCount.batch_id.in_(batch_ids))):
            counts[batch_id] = {st.value: int(n) for st, n in zip(JobState, ns, strict=True)}
        return counts

    @staticmethod
    def _deliverable(now: datetime) -> ColumnElement[bool]:
        return and_(
            WebhookDelivery.state == WEBHOOK_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
        )

    @_translate_errors
    def claim_due_webhooks(self, now: datetime, claim_s: float, limit: int) -> list[WebhookDeliveryRecord]:
        """Take up to `limit` pending deliveries whose next attempt is due and that no sender holds
        (or whose sender's claim ran out: it died), for `claim_s`: one conditional UPDATE, so two
        senders never send the same attempt. Oldest due first."""
        due = (
            select(WebhookDelivery.id)
            .where(self._deliverable(now))
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        table = _table_of(WebhookDelivery)
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(table)
                .where(table.c.id.in_(due), self._deliverable(now))
                .values(claimed_until=now + timedelta(seconds=claim_s))
                .returning(*table.c)
            ).all()
        return sorted((_record(WebhookDeliveryRecord, row) for row in rows), key=lambda d: d.created_at)

    @_translate_errors
    def record_webhook_attempt(
        self,
        delivery_id: str,
        *,
        status_code: int | None,
        error: str | None,
        duration_ms: float,
        delivered: bool,
        next_attempt_at: datetime | None,
        gave_up: bool,
        attempted_at: datetime | None = None,
    ) -> bool:
        """Keep one attempt and move its delivery on: delivered, failed (gave up), or pending until
        `next_attempt_at`; the claim is released. False when the delivery was no longer pending
        (another sender whose claim overlapped finished it first): the attempt is kept anyway."""
        now = utcnow()
        state = WEBHOOK_DELIVERED if delivered else WEBHOOK_FAILED if gave_up else WEBHOOK_PENDING
        with self._session() as s:
            s.execute(
                insert(WebhookAttempt).values(
                    delivery_id=delivery_id,
                    attempted_at=attempted_at or now,
                    status_code=status_code,
                    error=None if error is None else error[:2000],
                    duration_ms=duration_ms,
                )
            )
            result = s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == WEBHOOK_PENDING)
                .values(
                    state=state,
                    attempts=WebhookDelivery.attempts + 1,
                    claimed_until=None,
                    next_attempt_at=None if state != WEBHOOK_PENDING else next_attempt_at,
                    delivered_at=now if delivered else None,
                )
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    @_translate_errors
    def webhook_deliveries(self, batch_id: str) -> list[tuple[WebhookDeliveryRecord, list[WebhookAttemptRecord]]]:
        """A batch's deliveries, oldest first, each with its attempts in the order they were made."""
        with self._session() as s:
            deliveries = [
                _record(WebhookDeliveryRecord, row)
                for row in s.scalars(
                    select(WebhookDelivery)
                    .where(WebhookDelivery.batch_id == batch_id)
                    .order_by(WebhookDelivery.created_at)
                )
            ]
            attempts: dict[str, list[WebhookAttemptRecord]] = {d.id: [] for d in deliveries}
            if deliveries:
                rows = s.scalars(
                    select(WebhookAttempt)
                    .where(WebhookAttempt.delivery_id.in_(attempts))
                    .order_by(WebhookAttempt.attempted_at, WebhookAttempt.id)
                )
                for row in rows:
                    attempts[row.delivery_id].append(_record(WebhookAttemptRecord, row))
            return [(d, attempts[d.id]) for d in deliveries]

    # --- the dashboard ----------------------------------------------------------------------

    @_translate_errors
    def images_since(
        self, batch_ids: Sequence[str], since: datetime, *, owner: str | None | AnyOwner = ANY_OWNER
    ) -> dict[str, int]:
        """Images (succeeded jobs) of each batch finished at or after `since`, in one GROUP BY
        for all the batches; `owner` leaves out the batches another key owns."""
        if not batch_ids:
            return {}
        query = (
            select(Job.batch_id, func.count())
            .join(Batch, Batch.id == Job.batch_id)
            .where(
                Job.batch_id.in_(list(batch_ids)),
                Job.state == JobState.succeeded.value,
                Job.finished_at >= since,
            )
            .group_by(Job.batch_id)
        )
        if not isinstance(owner, AnyOwner):
            query = query.where(Batch.owner.is_(None) if owner is None else Batch.owner == owner)
        with self._session() as s:
            counts = {batch_id: 0 for batch_id in batch_ids}
            counts.update({batch_id: n for batch_id, n in s.execute(query)})
            return counts

    @_translate_errors
    def batch_of_object(self, key: str) -> str | None:
        """The batch of the job whose image is stored at `key`, or None. Found through indexed
        columns only: a batch image's key names its batch and row (`<batch>/<index>.<ext>`); a
        catalog image's (`<schedule>/<item>.<ext>`) is the key of its item's current job. The
        job's own `key` must equal `key` either way: the path is a hint, never trusted."""
        folder, _, leaf = key.partition("/")
        stem = leaf.rsplit(".", 1)[0]
        with self._session() as s:
            if stem.isdigit():
                found = s.scalar(
                    select(Job.batch_id).where(Job.batch_id == folder, Job.index == int(stem), Job.key == key)
                )
                if found is not None:
                    return found
            return s.scalar(
                select(Job.batch_id)
                .join(CatalogItem, CatalogItem.job_id == Job.id)
                .where(CatalogItem.schedule_name == folder, CatalogItem.item_id == stem, Job.key == key)
            )

    # --- worker rows (worker/presence.py writes them; `lcmq workers` and /metrics read them) ----

    @_translate_errors
    def upsert_worker(self, worker: WorkerRecord) -> None:
        """Write a worker process's row at its start; a node name seen before (a restarted
        process that reused it) starts afresh."""
        values = {f.name: getattr(worker, f.name) for f in fields(WorkerRecord)}
        with self._session() as s:
            statement = self._dialect_insert(s, WorkerProcess).values(**values)
            changed = {name: value for name, value in values.items() if name != "node"}
            s.execute(statement.on_conflict_do_update(index_elements=["node"], set_=changed))

    @staticmethod
    def _beat_values(beat: WorkerBeat, now: datetime) -> dict[str, Any]:
        values: dict[str, Any] = {"last_seen_at": now, "images": beat.images, "render_s": beat.render_s}
        learned = {
            "peak_memory_mb": beat.peak_memory_mb,
            "load_s": beat.load_s,
            "batch_size": beat.batch_size,
            "device": beat.device,
            "model_cache": beat.model_cache,
            "fetch_s": beat.fetch_s,
        }
        return values | {name: value for name, value in learned.items() if value is not None}

    @_translate_errors
    def heartbeat_worker(self, node: str, beat: WorkerBeat, now: datetime | None = None) -> bool:
        """The row's counters and last_seen_at; False when the row is missing (its upsert
        failed, or it was deleted): the caller writes it again."""
        with self._session() as s:
            statement = update(WorkerProcess).where(WorkerProcess.node == node)
            return _rowcount(s.execute(statement.values(**self._beat_values(beat, now or utcnow())))) == 1

    @_translate_errors
    def stop_worker(self, node: str, beat: WorkerBeat, now: datetime | None = None) -> bool:
        """A clean shutdown: the last counters, and stopped_at. False when the row is missing."""
        now = now or utcnow()
        with self._session() as s:
            statement = update(WorkerProcess).where(WorkerProcess.node == node)
            return _rowcount(s.execute(statement.values(**self._beat_values(beat, now), stopped_at=now))) == 1

    @_translate_errors
    def worker_row(self, node: str) -> WorkerRecord | None:
        with self._session() as s:
            row = s.get(WorkerProcess, node)
            return None if row is None else _record(WorkerRecord, row)

    @_translate_errors
    def workers(self, include_stopped: bool = False) -> list[WorkerRecord]:
        """Worker rows by profile and node; stopped ones only with include_stopped. (The table
        holds a row per worker process ever started: small next to jobs.)"""
        query = select(WorkerProcess).order_by(WorkerProcess.profile, WorkerProcess.node)
        if not include_stopped:
            query = query.where(WorkerProcess.stopped_at.is_(None))
        with self._session() as s:
            return [_record(WorkerRecord, row) for row in s.scalars(query)]

    @_translate_errors
    def workers_named(self, names: Sequence[str]) -> list[WorkerRecord]:
        """The rows (stopped ones too) of the workers whose jobs carry these names in
        jobs.worker: the name itself, or `<name>#<pid>` for a prefork pool child (lcmq.costs.
        job_worker_of tells which name a row serves; a row that merely starts alike is kept
        out there)."""
        if not names:
            return []
        children = [WorkerProcess.node.like(_like_escaped(name) + "#%", escape="\\") for name in names]
        query = select(WorkerProcess).where(or_(WorkerProcess.node.in_(list(names)), *children))
        with self._session() as s:
            return [_record(WorkerRecord, row) for row in s.scalars(query.order_by(WorkerProcess.started_at))]

    @_translate_errors
    def worker_job_sums(self, batch_id: str) -> list[WorkerJobSums]:
        """Per worker, the batch's images and failures, its images' render time and the span
        from its first image's claim to its last image's record: one GROUP BY over the batch's
        settled jobs (the (batch_id, state, dispatched_at) index finds them)."""
        succeeded = Job.state == JobState.succeeded.value
        query = (
            select(
                Job.worker,
                func.sum(case((succeeded, 1), else_=0)),
                func.sum(case((succeeded, 0), else_=1)),
                func.sum(case((succeeded, Job.render_ms), else_=0.0)),
                func.min(case((succeeded, Job.started_at), else_=None)),
                func.max(case((succeeded, Job.finished_at), else_=None)),
            )
            .where(
                Job.batch_id == batch_id,
                Job.state.in_([JobState.succeeded.value, JobState.failed.value]),
                Job.worker.is_not(None),
            )
            .group_by(Job.worker)
            .order_by(Job.worker)
        )
        with self._session() as s:
            return [
                WorkerJobSums(
                    worker=worker,
                    images=int(images or 0),
                    failed=int(failed or 0),
                    render_ms=float(render_ms or 0.0),
                    first_started_at=_aware(first),
                    last_finished_at=_aware(last),
                )
                for worker, images, failed, render_ms, first, last in s.execute(query)
            ]

    @_translate_errors
    def vacuum_jobs(self) -> None:
        """VACUUM (ANALYZE) the jobs table now, as autovacuum would soon after a bulk write
        (bench/dispatch.py --backlog, after filling 10^6 rows, so that its measurement does not
        share the cores with autovacuum). Postgres only; elsewhere nothing."""
        if self.engine.dialect.name != "postgresql":
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM (ANALYZE) jobs"))

    @_translate_errors
    def jobs_table_sizes(self) -> dict[str, int]:
        """Bytes on disk of the jobs table (heap and TOAST: "jobs") and of each of its indexes,
        by name (Postgres; empty elsewhere): what a job costs the database (docs/benchmarks.md)."""
        if self.engine.dialect.name != "postgresql":
            return {}
        with self.engine.connect() as conn:
            heap = conn.execute(text("SELECT pg_table_size('jobs')")).scalar_one()
            indexes = conn.execute(
                text(
                    "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'jobs'::regclass"
                )
            ).all()
        return {"jobs": int(heap)} | {name: int(size) for name, size in indexes}

    # --- farm metrics (lcmq/http/farm.py, scraped every ~15 s) ----------------------------------

    @_translate_errors
    def job_counts_by_profile(self, states: Sequence[JobState]) -> dict[tuple[str, str], int]:
        """Jobs in `states` by (profile, state). Postgres: the batches' counters summed per
        profile (a row per batch, whatever the jobs). SQLite: jobs counted per (batch_id, state)
        first, which the (batch_id, state, …) index answers alone, then summed per profile."""
        with self._session() as s:
            if s.get_bind().dialect.name == "postgresql":
                columns = [func.sum(getattr(BatchCount, state.value)) for state in states]
                rows = s.execute(
                    select(Batch.profile, *columns)
                    .join(BatchCount, BatchCount.batch_id == Batch.id)
                    .group_by(Batch.profile)
                )
                return {
                    (profile, state.value): int(n)
                    for profile, *ns in rows
                    for state, n in zip(states, ns, strict=True)
                    if n
                }
            per_batch = (
                select(Job.batch_id, Job.state, func.count().label("n"))
                .where(Job.state.in_([state.value for state in states]))
                .group_by(Job.batch_id, Job.state)
                .subquery()
            )
            query = (
                select(Batch.profile, per_batch.c.state, func.sum(per_batch.c.n))
                .join(per_batch, per_batch.c.batch_id == Batch.id)
                .group_by(Batch.profile, per_batch.c.state)
            )
            return {(profile, state): int(n) for profile, state, n in s.execute(query)}

    @_translate_errors
    def oldest_queued_by_profile(self) -> dict[str, datetime]:
        """Per profile, the earliest dispatched_at of its queued jobs: when the message the
        oldest waiting job is in was sent. Jobs waiting for the sweeper's redispatch (NULL) are
        in no queue yet and do not count. Postgres: only batches whose counters have queued jobs,
        one probe each of the (batch_id, state, dispatched_at) index."""
        with self._session() as s:
            if s.get_bind().dialect.name == "postgresql":
                oldest = (
                    select(Job.dispatched_at)
                    .where(
                        Job.batch_id == Batch.id,
                        Job.state == JobState.queued.value,
                        Job.dispatched_at.is_not(None),
                    )
                    .order_by(Job.dispatched_at)
                    .limit(1)
                    .lateral("oldest")
                )
                query = (
                    select(Batch.profile, func.min(oldest.c.dispatched_at))
                    .join(BatchCount, BatchCount.batch_id == Batch.id)
                    .join(oldest, true())
                    .where(BatchCount.queued > 0)
                    .group_by(Batch.profile)
                )
            else:
                query = (
                    select(Batch.profile, func.min(Job.dispatched_at))
                    .join(Batch, Batch.id == Job.batch_id)
                    .where(Job.state == JobState.queued.value, Job.dispatched_at.is_not(None))
                    .group_by(Batch.profile)
                )
            rows = s.execute(query).all()
        # SQLite hands datetimes back naive; everything lcmq writes is UTC.
        return {profile: oldest.replace(tzinfo=oldest.tzinfo or UTC) for profile, oldest in rows if oldest}
