"""Repository semantics on real Postgres: one owner per job, final writes only by the owner."""

from __future__ import annotations

import sqlite3
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import psycopg
import pytest
from helpers import create_test_batch
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from lcmq.errors import DatabaseError, NotFoundError, QueryError, RecordError, SchemaError, is_transient
from lcmq.migrate import upgrade
from lcmq.models import JobState
from lcmq.repository import Repository, StoredImage, database_error_kind


@pytest.fixture
def repo(migrated_pg_url):
    return Repository(migrated_pg_url)


def _batch(repo: Repository, n: int = 3) -> tuple[str, list[str]]:
    return create_test_batch(repo, n)


def test_a_job_is_claimed_by_one_worker_only(repo):
    batch_id, job_ids = _batch(repo)
    first = repo.claim(job_ids, "worker-a", lease_s=60)
    second = repo.claim(job_ids, "worker-b", lease_s=60)
    assert [j.id for j in first] == job_ids and second == []
    assert all(j.state == "running" and j.attempts == 1 and j.worker == "worker-a" for j in first)
    assert repo.state_counts(batch_id)["running"] == 3


def test_an_expired_lease_can_be_claimed_again(repo):
    _, job_ids = _batch(repo, 1)
    repo.claim(job_ids, "worker-a", lease_s=0.2)
    time.sleep(0.4)
    (again,) = repo.claim(job_ids, "worker-b", lease_s=60)
    assert again.worker == "worker-b" and again.attempts == 2
    # worker-a lost the lease: its late write is refused and does not clobber worker-b's claim
    assert repo.record_success(job_ids[0], "worker-a", "k", "0" * 64, 1.0, 1) is False
    assert repo.record_success(job_ids[0], "worker-b", "k", "f" * 64, 1.0, 1) is True
    (job,) = repo.jobs(_batch_of(repo, job_ids[0]))
    assert job.state == "succeeded" and job.sha256 == "f" * 64


def _batch_of(repo: Repository, job_id: str) -> str:
    for batch, _ in repo.recent_batches(100):
        if any(j.id == job_id for j in repo.jobs(batch.id)):
            return batch.id
    raise AssertionError(job_id)


def test_final_jobs_are_not_claimable(repo):
    batch_id, job_ids = _batch(repo, 2)
    repo.claim(job_ids, "w", lease_s=60)
    repo.record_success(job_ids[0], "w", "k0", "a" * 64, 1.0, 2)
    repo.record_failure([job_ids[1]], "w", "boom")
    assert repo.claim(job_ids, "w2", lease_s=60) == []
    counts = repo.state_counts(batch_id)
    assert counts["succeeded"] == 1 and counts["failed"] == 1
    failed = repo.jobs(batch_id)[1]
    assert failed.error == "boom" and failed.finished_at is not None


def test_released_jobs_are_queued_again(repo):
    batch_id, job_ids = _batch(repo, 2)
    repo.claim(job_ids, "w", lease_s=60)
    handed = repo.release(job_ids, "w", "s3 down", max_handbacks=5)
    assert (sorted(handed.requeued), handed.failed, handed.handbacks) == (sorted(job_ids), [], 1)
    assert repo.state_counts(batch_id)["queued"] == 2
    assert len(repo.claim(job_ids, "w2", lease_s=60)) == 2


def test_a_job_handed_back_too_often_fails_with_the_last_reason(repo):
    batch_id, (job_id,) = _batch(repo, 1)
    for handback in (1, 2):
        repo.claim([job_id], "w", lease_s=60)
        handed = repo.release([job_id], "w", f"s3 down #{handback}", max_handbacks=2)
        assert (handed.requeued, handed.failed, handed.handbacks) == ([job_id], [], handback)
    repo.claim([job_id], "w", lease_s=60)
    handed = repo.release([job_id], "w", "s3 down #3", max_handbacks=2)  # the third would pass the cap
    assert (handed.requeued, handed.failed) == ([], [job_id])
    (job,) = repo.jobs(batch_id)
    assert (job.state, job.attempts) == ("failed", 1) and job.finished_at is not None
    assert job.error == "s3 down #3; handed back 2 times, giving up"
    assert repo.claim([job_id], "w", lease_s=60) == []
    # `lcmq retry` starts the count again
    repo.requeue(batch_id, [JobState.failed], reset_attempts=True)
    repo.claim([job_id], "w", lease_s=60)
    assert repo.release([job_id], "w", "s3 down", max_handbacks=2).handbacks == 1


def test_create_batch_is_all_or_nothing(repo):
    batch_id, _ = _batch(repo, 1)
    duplicate_index = [
        {
            "id": uuid.uuid4().hex,
            "index": 0,
            "prompt": "p",
            "negative_prompt": "",
            "seed": 0,
            "steps": 4,
            "guidance": 1.0,
            "width": 64,
            "height": 64,
            "meta": {},
        }
    ] * 2
    new_batch = uuid.uuid4().hex[:16]
    with pytest.raises(RecordError, match="duplicate key"):
        repo.create_batch(
            {
                "id": new_batch,
                "name": None,
                "profile": "tiny",
                "total": 2,
                "seed": 1,
                "output": "file:///x/",
                "options": {},
            },
            duplicate_index,
        )
    with pytest.raises(NotFoundError):
        repo.get_batch(new_batch)
    assert repo.get_batch(batch_id).total == 1


def test_metadata_and_options_round_trip(repo):
    batch_id, _ = _batch(repo, 2)
    jobs = repo.jobs(batch_id)
    assert [j.meta for j in jobs] == [{"i": 0}, {"i": 1}]
    assert repo.get_batch(batch_id).created_at.tzinfo is not None


def test_an_expired_job_at_its_attempt_limit_is_left_for_the_sweeper(repo):
    batch_id, job_ids = _batch(repo, 1)
    for attempt in range(3):
        (job,) = repo.claim(job_ids, f"worker-{attempt}", lease_s=0.05, max_attempts=3)
        assert job.attempts == attempt + 1
        time.sleep(0.1)  # the worker died: the lease runs out
    assert repo.claim(job_ids, "worker-4", lease_s=60, max_attempts=3) == []  # a redelivered message
    repo.recover_expired(max_attempts=3)  # the sweeper fails it
    (job,) = repo.jobs(batch_id)
    assert (job.state, job.attempts) == ("failed", 3) and "attempt 3 of 3" in job.error


# --- database errors: classified by driver class and SQLSTATE, never by message --------------

SERIALIZABLE = "options=-c%20default_transaction_isolation%3Dserializable"


@contextmanager
def _row_locked_elsewhere(url: str, job_id: str):
    """Another transaction that has updated the job's row and not committed yet."""
    with psycopg.connect(url.replace("+psycopg", "")) as other:
        other.execute("UPDATE jobs SET error = 'elsewhere' WHERE id = %s", (job_id,))
        yield other


def _blocked_on(url: str, job_id: str, call) -> Future:
    """Run `call` in a thread and return once its statement waits for the row lock."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as watcher:
        deadline = time.monotonic() + 10
        while not watcher.execute(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone():
            assert time.monotonic() < deadline and not future.done(), future
            time.sleep(0.02)
    return future


def _waiting_pid(url: str) -> int:
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as watcher:
        return watcher.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()[0]


def test_a_serialization_failure_is_transient(repo, migrated_pg_url):
    _, (job_id,) = _batch(repo, 1)
    repo.claim([job_id], "w", lease_s=60)
    serializable = Repository(f"{migrated_pg_url}?{SERIALIZABLE}")
    try:
        with _row_locked_elsewhere(migrated_pg_url, job_id) as other:
            renewal = _blocked_on(migrated_pg_url, job_id, lambda: serializable.extend_leases([job_id], "w", 60))
            other.commit()  # the row changed after the renewal's snapshot: it cannot serialize
        error = renewal.exception(timeout=10)
    finally:
        serializable.engine.dispose()
    assert isinstance(error, DatabaseError) and is_transient(error), error
    assert isinstance(error.__cause__.orig, psycopg.errors.SerializationFailure)


def test_a_terminated_backend_is_transient(repo, migrated_pg_url):
    _, (job_id,) = _batch(repo, 1)
    repo.claim([job_id], "w", lease_s=60)
    with _row_locked_elsewhere(migrated_pg_url, job_id) as other:
        renewal = _blocked_on(migrated_pg_url, job_id, lambda: repo.extend_leases([job_id], "w", 60))
        other.execute("SELECT pg_terminate_backend(%s)", (_waiting_pid(migrated_pg_url),))
        error = renewal.exception(timeout=10)
    assert isinstance(error, DatabaseError) and is_transient(error), error


def test_a_programming_error_is_permanent(repo):
    # A bug in a statement (here: an integer compared with the text column `id`) fails the same
    # way on every retry: it must not be handed back to the queue as a passing fault.
    with pytest.raises(QueryError, match="operator does not exist") as caught:
        repo.jobs(12345)
    assert not is_transient(caught.value)
    assert isinstance(caught.value.__cause__.orig, psycopg.errors.UndefinedFunction)


def test_a_data_error_is_permanent(repo):
    _, (job_id,) = _batch(repo, 1)
    repo.claim([job_id], "w", lease_s=60)
    too_large = StoredImage(job_id, "k", "a" * 64, 1.0, batch_size=2**40)  # the column is an integer
    with pytest.raises(RecordError, match="out of range") as caught:
        repo.record_successes([too_large], "w")
    assert not is_transient(caught.value)


def test_a_missing_table_on_postgres_says_to_upgrade(own_pg_url):
    repo = Repository(own_pg_url)
    with repo.engine.begin() as conn:
        conn.execute(text("DROP TABLE catalog_items"))
    with pytest.raises(SchemaError, match="lcmq db upgrade"):
        repo.catalog_counts("nightly")


def test_a_missing_column_on_sqlite_says_to_upgrade(tmp_path):
    # SQLite's result code for "no such column" is the generic SQLITE_ERROR: the schema decides.
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url)
    repo = Repository(url)
    with repo.engine.begin() as conn:
        conn.execute(text("ALTER TABLE schedules DROP COLUMN last_error"))
    with pytest.raises(SchemaError, match="lcmq db upgrade"):
        repo.schedules()
    upgrade(f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(QueryError):  # with an intact schema the failed statement is a bug
        Repository(f"sqlite:///{tmp_path / 'new.db'}").update_schedule("x", nonsense=1)


def test_a_locked_sqlite_database_is_transient(tmp_path):
    """SQLITE_BUSY from a real second connection, classified by its result code."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    writer = sqlite3.connect(path, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as caught:
        writer.execute("INSERT INTO t VALUES (1)")
    holder.close()
    writer.close()
    assert caught.value.sqlite_errorcode == sqlite3.SQLITE_BUSY
    assert database_error_kind(caught.value) is DatabaseError
    assert database_error_kind(sa_exc.OperationalError("INSERT", {}, caught.value)) is DatabaseError
