"""Every database operation of lcmq. Callers get plain records, never a session.

Driver errors are translated here (`raise ... from`): a lost connection becomes a transient
DatabaseError, a missing table a SchemaError that says to run `lcmq db upgrade`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from lcmq.errors import DatabaseError, NotFoundError, RecordError, SchemaError
from lcmq.models import Batch, Job, JobState


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


@dataclass(frozen=True)
class JobRecord:
    id: str
    batch_id: str
    index: int
    state: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    meta: dict[str, Any]
    attempts: int
    worker: str | None
    error: str | None
    key: str | None
    sha256: str | None
    render_ms: float | None
    batch_size: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def _record(cls, row) -> Any:
    values = {f.name: getattr(row, f.name) for f in fields(cls)}
    for name, value in values.items():
        if isinstance(value, datetime):
            values[name] = _aware(value)
    return cls(**values)


def normalize_url(url: str) -> str:
    """Let users write postgresql:// URLs; lcmq drives Postgres with psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
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


def _translate_errors(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sa_exc.OperationalError, sa_exc.ProgrammingError) as exc:
            text = str(exc.orig if exc.orig is not None else exc).lower()
            if "no such table" in text or ("relation" in text and "does not exist" in text):
                raise SchemaError("the database has no lcmq schema: run `lcmq db upgrade` "
                                  f"({self.safe_url})") from exc
            raise DatabaseError(f"database error in {method.__name__}: {exc.orig or exc}") from exc
        except (sa_exc.InterfaceError, sa_exc.DisconnectionError) as exc:
            raise DatabaseError(f"database connection lost in {method.__name__}: {exc}") from exc
        except (sa_exc.IntegrityError, sa_exc.DataError) as exc:
            # The data itself was refused: retrying the same write cannot help.
            raise RecordError(f"database refused the data in {method.__name__}: {exc.orig or exc}") from exc
    return wrapper


class Repository:
    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- producer side --------------------------------------------------------------------

    @_translate_errors
    def create_batch(self, batch: dict[str, Any], jobs: Sequence[dict[str, Any]]) -> None:
        """The batch and all its jobs in one transaction: all of them exist, or none."""
        now = utcnow()
        with self._session() as s:
            s.execute(insert(Batch), [batch | {"created_at": now}])
            rows = [job | {"batch_id": batch["id"], "state": JobState.queued.value, "attempts": 0,
                           "created_at": now} for job in jobs]
            for start in range(0, len(rows), 5000):
                s.execute(insert(Job), rows[start:start + 5000])

    @_translate_errors
    def get_batch(self, batch_id: str) -> BatchRecord:
        with self._session() as s:
            row = s.get(Batch, batch_id)
            if row is None:
                raise NotFoundError(f"no batch {batch_id!r}")
            return _record(BatchRecord, row)

    @_translate_errors
    def state_counts(self, batch_id: str) -> dict[str, int]:
        with self._session() as s:
            rows = s.execute(select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state))
            counts = {state.value: 0 for state in JobState}
            counts.update({state: n for state, n in rows})
            return counts

    @_translate_errors
    def recent_batches(self, limit: int = 20) -> list[tuple[BatchRecord, dict[str, int]]]:
        with self._session() as s:
            batches = [_record(BatchRecord, b) for b in
                       s.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit))]
            if not batches:
                return []
            counts: dict[str, dict[str, int]] = {b.id: {st.value: 0 for st in JobState} for b in batches}
            rows = s.execute(select(Job.batch_id, Job.state, func.count())
                             .where(Job.batch_id.in_(counts)).group_by(Job.batch_id, Job.state))
            for batch_id, state, n in rows:
                counts[batch_id][state] = n
            return [(b, counts[b.id]) for b in batches]

    @_translate_errors
    def jobs(self, batch_id: str, state: JobState | None = None) -> list[JobRecord]:
        with self._session() as s:
            query = select(Job).where(Job.batch_id == batch_id).order_by(Job.index)
            if state is not None:
                query = query.where(Job.state == state.value)
            return [_record(JobRecord, j) for j in s.scalars(query)]

    # --- worker side ----------------------------------------------------------------------

    @_translate_errors
    def claim(self, job_ids: Sequence[str], worker: str, lease_s: float) -> list[JobRecord]:
        """Take the jobs that are free: queued, or running under a lease that expired.

        A conditional update, so two workers handed the same ids never both own a job.
        """
        now = utcnow()
        claimable = or_(Job.state == JobState.queued.value,
                        (Job.state == JobState.running.value) & (Job.lease_until < now))
        with self._session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), claimable)
                .values(state=JobState.running.value, attempts=Job.attempts + 1, worker=worker,
                        lease_until=now + timedelta(seconds=lease_s), started_at=now, error=None)
                .returning(Job)
                .execution_options(synchronize_session=False)
            )
            claimed = [_record(JobRecord, j) for j in result.scalars()]
        return sorted(claimed, key=lambda j: j.index)

    def _held(self, job_id: str, worker: str):
        return (Job.id == job_id) & (Job.state == JobState.running.value) & (Job.worker == worker)

    @_translate_errors
    def record_success(self, job_id: str, worker: str, key: str, sha256: str, render_ms: float,
                       batch_size: int) -> bool:
        """Mark a job done if this worker still holds it; False when the lease was lost."""
        with self._session() as s:
            result = s.execute(
                update(Job).where(self._held(job_id, worker))
                .values(state=JobState.succeeded.value, key=key, sha256=sha256, render_ms=render_ms,
                        batch_size=batch_size, finished_at=utcnow(), lease_until=None)
                .execution_options(synchronize_session=False))
            return result.rowcount == 1

    @_translate_errors
    def record_failure(self, job_ids: Sequence[str], worker: str, error: str) -> int:
        with self._session() as s:
            result = s.execute(
                update(Job).where(Job.id.in_(list(job_ids)), Job.state == JobState.running.value,
                                  Job.worker == worker)
                .values(state=JobState.failed.value, error=error[:4000], finished_at=utcnow(), lease_until=None)
                .execution_options(synchronize_session=False))
            return result.rowcount

    @_translate_errors
    def release(self, job_ids: Sequence[str], worker: str, error: str | None = None) -> int:
        """Hand jobs back to the queue (a transient failure, a shutdown)."""
        with self._session() as s:
            result = s.execute(
                update(Job).where(Job.id.in_(list(job_ids)), Job.state == JobState.running.value,
                                  Job.worker == worker)
                .values(state=JobState.queued.value, error=error, lease_until=None)
                .execution_options(synchronize_session=False))
            return result.rowcount
