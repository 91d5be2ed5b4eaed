"""manifest.jsonl bookkeeping on real Postgres and a local folder: when a batch is due one,
that a stale writer cannot mark it, and that a retry makes it due again. Jobs are driven
through the repository the way a worker drives them (no worker process: it is about the rows)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from helpers import create_test_batch

from lcmq.manifest import write_manifest
from lcmq.models import JobState
from lcmq.repository import Repository, StoredImage, utcnow
from lcmq.storage import FileStorage

pytestmark = pytest.mark.services


def _batch(repo: Repository, n: int) -> tuple[str, list[str]]:
    options = {"model": "null", "image_format": "webp", "quality": 80}
    return create_test_batch(repo, n, profile="null", options=options, ids_from_batch=True)


def _succeed(repo: Repository, batch_id: str, job_ids: list[str]) -> None:
    repo.claim(job_ids, "w", lease_s=60)
    repo.record_successes(
        [StoredImage(j, f"{batch_id}/{int(j[16:], 16):06d}.webp", "a" * 64, 1.0, 2) for j in job_ids], "w"
    )


def _lines(store: FileStorage, batch_id: str) -> list[dict]:
    return [json.loads(line) for line in store.get(store.manifest_key(batch_id)).decode().splitlines()]


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request, tmp_path):
    """Postgres of the farm, and SQLite of the embedded default (datetimes come back naive)."""
    if request.param == "postgres":
        return request.getfixturevalue("own_pg_url")
    from lcmq.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'lcmq.db'}"
    upgrade(url)
    return url


def test_manifest_is_due_once_finished_and_again_after_a_retry(db_url, tmp_path):
    repo, store = Repository(db_url), FileStorage(tmp_path / "renders")
    batch_id, jobs = _batch(repo, 4)
    later = utcnow() + timedelta(seconds=60)

    assert repo.manifest_version(batch_id) is None  # queued jobs: not finished
    assert write_manifest(repo, store, batch_id) is False and not store.exists(store.manifest_key(batch_id))
    assert repo.finished_batches_needing_manifest(later) == []

    _succeed(repo, batch_id, jobs[:3])
    repo.claim(jobs[3:], "w", lease_s=60)
    assert repo.finished_batches_needing_manifest(later) == []  # a job still running
    repo.record_failure(jobs[3:], "w", "boom")
    version = repo.manifest_version(batch_id)
    assert version == max(j.finished_at for j in repo.jobs(batch_id))
    assert repo.finished_batches_needing_manifest(later) == [batch_id]
    # Within the grace after the last finish, the worker that finished it is presumed writing it.
    assert repo.finished_batches_needing_manifest(version - timedelta(seconds=1)) == []

    assert write_manifest(repo, store, batch_id) is True
    records = _lines(store, batch_id)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[0]["key"] == f"{batch_id}/000000.webp" and records[0]["format"] == "webp"
    assert records[0]["quality"] == 80 and records[0]["metadata"] == {"i": 0}
    assert repo.get_batch(batch_id).manifest_at == version
    assert repo.finished_batches_needing_manifest(later) == []
    assert [p.name for p in (tmp_path / "renders" / batch_id).iterdir()] == ["manifest.jsonl"]  # no temp left

    # retry --failed: due again, and a writer still holding the old version cannot mark it.
    assert repo.requeue(batch_id, [JobState.failed], reset_attempts=True) == 1
    assert repo.get_batch(batch_id).manifest_at is None
    assert repo.mark_manifest_written(batch_id, version) is False
    _succeed(repo, batch_id, jobs[3:])
    assert repo.mark_manifest_written(batch_id, version) is False  # finished again, but later
    assert repo.finished_batches_needing_manifest(utcnow() + timedelta(seconds=60)) == [batch_id]
    assert write_manifest(repo, store, batch_id) is True
    assert [r["index"] for r in _lines(store, batch_id)] == [0, 1, 2, 3]
    assert repo.get_batch(batch_id).manifest_at > version

    # A retry that finds nothing to requeue leaves the manifest current.
    assert repo.requeue(batch_id, [JobState.failed], reset_attempts=True) == 0
    assert repo.get_batch(batch_id).manifest_at is not None


def test_jobs_are_paged_in_row_order(own_pg_url):
    repo = Repository(own_pg_url)
    batch_id, jobs = _batch(repo, 7)
    _succeed(repo, batch_id, [jobs[i] for i in (6, 0, 3, 4, 1)])
    paged = list(repo.iter_jobs(batch_id, JobState.succeeded, page=2))
    assert [j.index for j in paged] == [0, 1, 3, 4, 6]
    assert [j.index for j in repo.iter_jobs(batch_id, JobState.queued, page=2)] == [2, 5]


def test_a_stored_manifest_is_not_written_again_for_a_late_message(db_url, tmp_path):
    repo, store = Repository(db_url), FileStorage(tmp_path / "renders")
    batch_id, jobs = _batch(repo, 2)
    _succeed(repo, batch_id, jobs)
    assert write_manifest(repo, store, batch_id) is True
    store.delete(store.manifest_key(batch_id))  # so that a second write would show

    assert write_manifest(repo, store, batch_id) is False  # the same version is stored: nothing to do
    assert not store.exists(store.manifest_key(batch_id))
