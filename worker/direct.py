"""The direct adapters of the worker's ports (worker/ports.py): a trusted machine's worker with
the database, broker and bucket credentials. Thin wrappers: the SQL stays in
`lcmq.repository.Repository`, the bucket calls in `lcmq.storage.Storage`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lcmq.manifest import write_manifest
from lcmq.queue import publish_chunks
from lcmq.repository import BatchRecord, HandBack, JobRecord, Repository, StoredImage
from lcmq.settings import Settings
from lcmq.storage import Storage, read_url

log = logging.getLogger("lcmq.worker")


@dataclass(frozen=True)
class DirectJobStore:
    """Jobs in the database, claimed as `worker` (the Celery node name)."""

    repo: Repository
    worker: str
    storage: Storage | None = None  # where the batch's manifest goes once its last job is recorded

    def claim(self, job_ids: Sequence[str], lease_s: float, max_attempts: int | None = None) -> list[JobRecord]:
        return self.repo.claim(job_ids, self.worker, lease_s, max_attempts)

    def renew(self, job_ids: Sequence[str], lease_s: float) -> set[str] | None:
        self.repo.extend_leases(job_ids, self.worker, lease_s)
        return None  # a lost lease shows at the record (a conditional update), as before

    def record(self, stored: Sequence[StoredImage]) -> int:
        return self.repo.record_successes(stored, self.worker)

    def fail(self, job_ids: Sequence[str], reason: str) -> int:
        return self.repo.record_failure(job_ids, self.worker, reason)

    def hand_back(self, job_ids: Sequence[str], reason: str | None, max_handbacks: int) -> HandBack:
        return self.repo.release(job_ids, self.worker, reason, max_handbacks=max_handbacks)

    def requeue(self, batch: BatchRecord, job_ids: Sequence[str], countdown_s: float) -> None:
        publish_chunks(batch.profile, [(batch.id, list(job_ids))], batch.priority, countdown_s=countdown_s)

    def batch_stored(self, batch: BatchRecord) -> None:
        """If the batch finished, write its manifest.jsonl (one indexed query when it did not).
        Left to the sweeper on failure."""
        if self.storage is None:
            return
        try:
            write_manifest(self.repo, self.storage, batch.id)
        except Exception as exc:  # noqa: BLE001 - the images are recorded; the sweeper writes it later
            log.warning("manifest not written", extra={"batch_id": batch.id, "error": f"{type(exc).__name__}: {exc}"})


@dataclass(frozen=True)
class DirectObjectStore:
    """The bucket (or folder) of the settings, with this machine's credentials."""

    storage: Storage
    settings: Settings

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        self.storage.put(key, data, content_type, metadata)

    def stored_sha256(self, key: str) -> str | None:
        return self.storage.stored_sha256(key)

    def job_image_key(self, job_key: str | None, batch_id: str, index: int, ext: str) -> str:
        return self.storage.job_image_key(job_key, batch_id, index, ext)

    def read(self, url: str) -> bytes:
        s = self.settings
        return read_url(url, s.s3_endpoint_url, s.s3_region, s.s3_timeout_s, s.s3_max_attempts)
