"""Repository semantics on real Postgres: one owner per job, final writes only by the owner."""

from __future__ import annotations

import time
import uuid

import pytest

from lcmq.errors import NotFoundError
from lcmq.repository import Repository


@pytest.fixture
def repo(migrated_pg_url):
    return Repository(migrated_pg_url)


def _batch(repo: Repository, n: int = 3) -> tuple[str, list[str]]:
    batch_id = uuid.uuid4().hex[:16]
    job_ids = [uuid.uuid4().hex for _ in range(n)]
    repo.create_batch(
        {"id": batch_id, "name": None, "profile": "tiny", "total": n, "seed": 1, "output": "file:///x/",
         "options": {}},
        [{"id": job_id, "index": i, "prompt": f"p{i}", "negative_prompt": "", "seed": i, "steps": 4,
          "guidance": 1.0, "width": 64, "height": 64, "meta": {"i": i}} for i, job_id in enumerate(job_ids)])
    return batch_id, job_ids


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
    assert repo.release(job_ids, "w", "s3 down") == 2
    assert repo.state_counts(batch_id)["queued"] == 2
    assert len(repo.claim(job_ids, "w2", lease_s=60)) == 2


def test_create_batch_is_all_or_nothing(repo):
    batch_id, _ = _batch(repo, 1)
    from lcmq.errors import RecordError

    duplicate_index = [{"id": uuid.uuid4().hex, "index": 0, "prompt": "p", "negative_prompt": "", "seed": 0,
                        "steps": 4, "guidance": 1.0, "width": 64, "height": 64, "meta": {}}] * 2
    new_batch = uuid.uuid4().hex[:16]
    with pytest.raises(RecordError, match="duplicate key"):
        repo.create_batch({"id": new_batch, "name": None, "profile": "tiny", "total": 2, "seed": 1,
                           "output": "file:///x/", "options": {}}, duplicate_index)
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
