"""Costs that stay flat with the size of the jobs table (issue 14, part 4), on real Postgres.

1. The per-batch counters (batch_counts, kept by triggers) equal a real count of the jobs after
   every kind of transition a batch goes through: submit, claims (by ids, and the gateway's by
   profile), records of successes and failures, hand-backs, the sweeper's requeue and expiry,
   cancel, resume, retry, a token's revocation, and concurrent claims.
2. The statements the claim, renew, record, status and sweeper paths really issue (captured as
   they are sent) use indexes: EXPLAINed with sequential scans disabled, none scans `jobs` sequentially
   (with seqscan off, Postgres still picks a Seq Scan only where no index can serve).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from helpers import create_test_batch
from sqlalchemy import event

from lcmq.models import BatchCount, JobState
from lcmq.repository import Repository, StoredImage


@pytest.fixture
def repo(migrated_pg_url):
    return Repository(migrated_pg_url)


def _image(job_id: str) -> StoredImage:
    return StoredImage(job_id, f"k/{job_id}.png", "a" * 64, 1.5, 4)


def _assert_counts_exact(repo: Repository, *batch_ids: str) -> None:
    for batch_id in batch_ids:
        assert repo.state_counts(batch_id) == repo.recount_states(batch_id), batch_id


def test_counters_have_a_column_per_job_state():
    assert {c.name for c in BatchCount.__table__.columns} - {"batch_id"} == {s.value for s in JobState}


def test_counters_equal_a_real_count_through_every_transition(repo):
    profile = f"scale-{uuid.uuid4().hex[:8]}"
    batch_id, ids = create_test_batch(repo, 40, profile=profile)
    other_id, other_ids = create_test_batch(repo, 6, profile=profile)
    assert repo.state_counts(batch_id) == {"queued": 40, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    _assert_counts_exact(repo, batch_id, other_id)

    # Claims, records of successes and failures, renewals, dispatch stamps.
    repo.claim(ids[:12], "w1", lease_s=60)
    repo.extend_leases(ids[:12], "w1", lease_s=60)  # no state moves: nothing to count
    repo.mark_dispatched(ids[30:])
    assert repo.record_successes([_image(j) for j in ids[:8]], "w1") == 8
    assert repo.record_successes([_image(ids[0])], "w1") == 0  # already recorded: refused
    repo.record_failure(ids[8:10], "w1", "poison")
    _assert_counts_exact(repo, batch_id)
    # A hand-back: requeued, and failed once over the cap.
    handed = repo.release([ids[10]], "w1", "s3 down", max_handbacks=1)
    assert handed.requeued == [ids[10]]
    repo.claim([ids[10]], "w1", lease_s=60)
    assert repo.release([ids[10]], "w1", "s3 down", max_handbacks=1).failed == [ids[10]]
    _assert_counts_exact(repo, batch_id)

    # The sweeper: expired leases in two batches at once, requeued or failed at max attempts.
    repo.claim(ids[12:16] + other_ids[:2], "w2", lease_s=0.05)
    time.sleep(0.2)
    assert repo.recover_expired(max_attempts=1) == (0, 6)
    repo.claim(ids[16:18], "w2", lease_s=0.05)
    time.sleep(0.2)
    assert repo.recover_expired(max_attempts=5) == (2, 0)
    jobs = {job.id: job for job in repo.jobs(batch_id)}
    gave_up, requeued = jobs[ids[12]], jobs[ids[16]]
    assert (gave_up.state, gave_up.error) == ("failed", "worker lost during attempt 1 of 1; giving up")
    assert gave_up.finished_at is not None and gave_up.lease_until is None
    assert (requeued.state, requeued.error, requeued.dispatched_at) == ("queued", "worker lost during attempt 1", None)
    _assert_counts_exact(repo, batch_id, other_id)

    # The gateway's claim by profile, and a token's revocation that releases its jobs.
    assert repo.add_worker_token("t-scale", uuid.uuid4().hex, [profile], None)
    taken = repo.claim_next(profile, 5, "edge/t-scale/n1", lease_s=60, max_attempts=5, token="t-scale")
    assert len(taken) == 5
    assert repo.revoke_worker_token("t-scale", "edge/t-scale/") == 5
    _assert_counts_exact(repo, batch_id, other_id)

    # Concurrent claims of overlapping ids: each job once, every claim counted.
    with ThreadPoolExecutor(4) as pool:
        claimed = list(pool.map(lambda w: repo.claim(ids[18:34], f"c{w}", lease_s=60), range(4)))
    assert sum(len(c) for c in claimed) == 16
    _assert_counts_exact(repo, batch_id)

    # Cancel, resume (queued, expired running, canceled), retry of the failed with fresh attempts.
    assert repo.cancel_batch(batch_id) > 0
    _assert_counts_exact(repo, batch_id)
    repo.requeue(batch_id, [JobState.queued, JobState.running, JobState.canceled])
    _assert_counts_exact(repo, batch_id)
    failed_before = repo.state_counts(batch_id)["failed"]
    assert repo.requeue(batch_id, [JobState.failed], reset_attempts=True) == failed_before
    counts = repo.state_counts(batch_id)
    assert counts["failed"] == 0 and sum(counts.values()) == 40
    _assert_counts_exact(repo, batch_id, other_id)


def test_metrics_counts_come_from_the_counters(repo):
    profile = f"scale-{uuid.uuid4().hex[:8]}"
    _, ids = create_test_batch(repo, 5, profile=profile)
    repo.claim(ids[:2], "w", lease_s=60)
    repo.record_successes([_image(ids[0])], "w")
    counts = repo.job_counts_by_profile(list(JobState))
    assert {state: counts.get((profile, state), 0) for state in ("queued", "running", "succeeded")} == {
        "queued": 3,
        "running": 1,
        "succeeded": 1,
    }
    assert profile in repo.oldest_queued_by_profile()


@contextmanager
def _statements(repo: Repository):
    """Every statement the repository sends to Postgres meanwhile, with its parameters."""
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if not executemany:  # the Postgres paths send one statement each (record: FROM VALUES)
            seen.append((statement, parameters))

    event.listen(repo.engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(repo.engine, "before_cursor_execute", capture)


def _plans(repo: Repository, statements: list[tuple[str, object]]) -> list[str]:
    plans = []
    with repo.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        cursor = conn.connection.driver_connection.cursor()
        for statement, parameters in statements:
            cursor.execute("EXPLAIN " + statement, parameters)  # plans only: nothing is changed
            plans.append(statement + "\n" + "\n".join(row[0] for row in cursor.fetchall()))
        conn.exec_driver_sql("RESET enable_seqscan")
        conn.rollback()
    return plans


def _jobs_seq_scans(plans: list[str]) -> list[str]:
    return [plan for plan in plans if "Seq Scan on jobs" in plan]


def test_claim_renew_record_and_status_use_indexes(repo):
    profile = f"scale-{uuid.uuid4().hex[:8]}"
    batch_id, ids = create_test_batch(repo, 20, profile=profile)
    repo.engine.dispose()  # a fresh connection: no statement from setup is captured
    with _statements(repo) as seen:
        repo.claim(ids[:10], "w", lease_s=60)
        repo.claim_next(profile, 4, "edge/x/n", lease_s=60, max_attempts=3)
        repo.extend_leases(ids[:10], "w", lease_s=60)
        repo.record_successes([_image(j) for j in ids[:6]], "w")
        repo.record_failure(ids[6:8], "w", "boom")
        repo.release(ids[8:10], "w", "s3 down", max_handbacks=3)
        repo.state_counts(batch_id)
        repo.job_counts_by_profile(list(JobState))
        repo.oldest_queued_by_profile()
        repo.recover_expired(max_attempts=3)  # the sweeper's scans
        repo.pending_dispatch(limit=100)
    touching_jobs = [(sql, params) for sql, params in seen if "jobs" in sql or "batch_counts" in sql]
    assert len(touching_jobs) >= 12, [sql for sql, _ in seen]
    plans = _plans(repo, touching_jobs)
    assert _jobs_seq_scans(plans) == []
    # The check can fail: a filter on a column no index covers is planned as a Seq Scan even
    # with sequential scans off.
    assert _jobs_seq_scans(_plans(repo, [("SELECT id FROM jobs WHERE prompt = %(p)s", {"p": "x"})]))


def test_status_reads_no_job_row(repo):
    """A batch's status reads its counters, not its jobs: the count of a 10^6-job batch costs
    what a 3-job batch's does."""
    batch_id, _ = create_test_batch(repo, 3)
    with _statements(repo) as seen:
        repo.state_counts(batch_id)
    with repo.engine.connect() as conn:
        plans = [
            "\n".join(conn.exec_driver_sql("EXPLAIN " + sql, params).scalars().all())
            for sql, params in seen
            if sql.lstrip().upper().startswith("SELECT")
        ]
    assert plans and not any("on jobs" in plan for plan in plans), plans
