"""The worker's two ports to the outside world: a job store and an object store.

The render loop (worker/batch_render.py), the lease ledger (worker/leases.py) and the store
pipeline (worker/store.py) reach jobs and objects only through these, so one loop serves both
kinds of worker:
- direct (worker/direct.py): a trusted machine's Celery worker — Postgres through
  `lcmq.repository.Repository`, the bucket through `lcmq.storage.Storage`, with credentials;
- gateway (worker/gateway_client.py): an edge worker on a rented machine — the API process over
  HTTP with one worker token, objects through the presigned URLs the gateway hands out.

A job store is bound to the worker name that holds the jobs it claimed: settling a job through
it acts only while that worker still holds the job (a lost lease makes it a no-op, never an error).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lcmq.repository import BatchRecord, HandBack, JobRecord, StoredImage


class JobStore(Protocol):
    """Claim, renew, record, fail and hand back jobs, as one worker."""

    @property
    def worker(self) -> str:
        """The name the jobs' `worker` column holds while this store's jobs are leased."""
        ...

    def claim(self, job_ids: Sequence[str], lease_s: float, max_attempts: int | None = None) -> list[JobRecord]:
        """Take the free jobs among `job_ids` (a conditional claim: taken, done or canceled
        jobs are skipped). Only where work comes as job ids (Celery messages)."""
        ...

    def renew(self, job_ids: Sequence[str], lease_s: float) -> set[str] | None:
        """Extend the leases; the ids still held, or None when the store does not say (the
        caller keeps them all)."""
        ...

    def record(self, stored: Sequence[StoredImage]) -> int:
        """Record the jobs done; how many were (fewer: leases lost, another worker's record stands)."""
        ...

    def fail(self, job_ids: Sequence[str], reason: str) -> int: ...

    def hand_back(self, job_ids: Sequence[str], reason: str | None, max_handbacks: int) -> HandBack:
        """Back to the queue (attempt not counted), or failed once handed back too often."""
        ...

    def requeue(self, batch: BatchRecord, job_ids: Sequence[str], countdown_s: float) -> None:
        """After a hand-back by the store pipeline: make sure the jobs are found again (direct:
        a message after the backoff; gateway: nothing, queued jobs are claimed by profile)."""
        ...

    def batch_stored(self, batch: BatchRecord) -> None:
        """A chunk's last micro-batch is recorded: finish the batch if that was its last job
        (direct: the manifest; gateway: the gateway and the sweeper do that). Never raises."""
        ...


class ObjectStore(Protocol):
    """Where images go, and where a job's inputs (init images) are read from."""

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    def stored_sha256(self, key: str) -> str | None:
        """The sha256 of the object at key; None when there is none or it cannot be told."""
        ...

    def job_image_key(self, job_key: str | None, batch_id: str, index: int, ext: str) -> str:
        """Where a job's image goes (lcmq.storage.Storage.job_image_key: deterministic)."""
        ...

    def read(self, url: str) -> bytes:
        """The bytes of an input the job names (an init image): s3://, file:// or a presigned URL."""
        ...
