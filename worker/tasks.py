"""The render task: claim a chunk of jobs, render them in micro-batches, upload, record.

1. Claim the chunk's free jobs (a conditional update: redelivered or duplicate messages find
   nothing left to claim and do nothing) and renew their leases while working.
2. Get this process's pinned pipeline (loaded on the first task, never again).
3. For each micro-batch: stop if the batch was canceled or the worker is shutting down;
   render; encode PNG with parameters; upload under a key made of ids (an object already
   there with the same sha256 counts as uploaded); record key, sha256 and timing in the row,
   only while this worker still holds the job.
Transient faults hand the unfinished jobs back and retry the task with backoff and jitter;
permanent ones fail the affected jobs at once with the reason stored.
"""

from __future__ import annotations

import logging
import os
import random
import time

from lcmq.errors import LcmqError, ModelLoadError, is_transient
from lcmq.profiles import get_profile
from lcmq.queue import RENDER_TASK, get_app, publish_chunks
from lcmq.repository import BatchRecord, JobRecord, Repository
from lcmq.settings import get_settings
from lcmq.storage import Storage, sha256_hex, storage_from_settings

from worker.encode import PNG_CONTENT_TYPE, encode_png, parameters_text
from worker.lifecycle import Heartbeat, maybe_crash, shutting_down
from worker.pipeline import pinned_pipeline, truncation_warnings
from worker.render import micro_batches, render

log = logging.getLogger("lcmq.worker")
app = get_app()

WORKER_PROFILE_ENV = "LCMQ_WORKER_PROFILE"
MAX_TASK_RETRIES = 8


def backoff_s(retries: int) -> float:
    # Exponential with full jitter, so a farm does not retry a flaky bucket in lockstep.
    return random.uniform(0.5, min(60.0, 2.0 * 2**retries))


_CLIENTS: dict[int, tuple[Repository, Storage]] = {}


def process_clients() -> tuple[Repository, Storage]:
    """This process's repository and storage client, built once (an S3 client costs ~0.1 s)."""
    pid = os.getpid()
    if pid not in _CLIENTS:
        settings = get_settings()
        _CLIENTS[pid] = (Repository(settings.database_url_resolved), storage_from_settings(settings))
    return _CLIENTS[pid]


class ChunkRun:
    """One task's work over its jobs; `pending` holds the claimed jobs not yet final."""

    def __init__(self, batch_id: str, worker: str):
        self.settings = get_settings()
        self.batch_id = batch_id
        self.worker = worker
        self.repo, self.storage = process_clients()
        self.pending: dict[str, JobRecord] = {}

    def run(self, job_ids: list[str]) -> dict:
        batch = self.repo.get_batch(self.batch_id)
        served = os.environ.get(WORKER_PROFILE_ENV)
        if served and served != batch.profile:
            raise ModelLoadError(f"worker serves profile {served!r} but batch {self.batch_id} "
                                 f"needs {batch.profile!r}")
        claimed = self.repo.claim(job_ids, self.worker, self.settings.lease_s)
        self.pending = {job.id: job for job in claimed}
        if not claimed:
            log.info("chunk had nothing to claim", extra={"batch_id": self.batch_id, "jobs": len(job_ids)})
            return {"claimed": 0, "succeeded": 0}
        with Heartbeat(self._renew_leases, self.settings.lease_s / 3):
            succeeded = self._render_all(batch, claimed)
        log.info("chunk done", extra={"batch_id": self.batch_id, "claimed": len(claimed), "succeeded": succeeded,
                                      "worker": self.worker, "pid": os.getpid()})
        return {"claimed": len(claimed), "succeeded": succeeded}

    def _renew_leases(self) -> None:
        if self.pending:
            self.repo.extend_leases(list(self.pending), self.worker, self.settings.lease_s)

    def _render_all(self, batch: BatchRecord, claimed: list[JobRecord]) -> int:
        loaded = pinned_pipeline(get_profile(batch.profile), self.settings)
        succeeded = 0
        for group in micro_batches(claimed, self.settings.batch_size):
            if self._stopped(batch):
                break
            maybe_crash([job.prompt for job in group])
            warnings = truncation_warnings(loaded, [job.prompt for job in group])
            started = time.perf_counter()
            images = render(loaded, group)
            render_ms = (time.perf_counter() - started) * 1000 / len(group)
            for job, image, warning in zip(group, images, warnings, strict=True):
                succeeded += self._store(job, image, batch.profile, render_ms, len(group), warning)
        return succeeded

    def _stopped(self, batch: BatchRecord) -> bool:
        """Between micro-batches: a canceled batch or a stopping worker ends the chunk here."""
        if self.repo.batch_canceled(batch.id):
            count = self.repo.record_canceled(list(self.pending), self.worker)
            log.info("batch canceled, stopping chunk", extra={"batch_id": batch.id, "canceled": count})
            self.pending.clear()
            return True
        if shutting_down():
            self.hand_back(batch)
            return True
        return False

    def hand_back(self, batch: BatchRecord) -> None:
        """Shutdown: the unrendered jobs go back to the queue with a message of their own."""
        ids = list(self.pending)
        released = self.repo.release(ids, self.worker, "handed back at worker shutdown")
        publish_chunks(batch.profile, [(batch.id, ids)], batch.priority)
        log.info("worker stopping, jobs handed back", extra={"batch_id": batch.id, "released": released})
        self.pending.clear()

    def _store(self, job: JobRecord, image, profile: str, render_ms: float, batch_size: int,
               warning: str | None) -> int:
        data = encode_png(image, parameters_text(job, profile))
        digest = sha256_hex(data)
        key = self.storage.batch_key(job.batch_id, job.index)
        # Keys are deterministic: an attempt that uploaded and then died left this very object.
        if self.storage.stored_sha256(key) != digest:
            self.storage.put(key, data, PNG_CONTENT_TYPE,
                             {"job-id": job.id, "batch-id": job.batch_id, "seed": str(job.seed), "sha256": digest})
        recorded = self.repo.record_success(job.id, self.worker, key, digest, round(render_ms, 2), batch_size,
                                            warning)
        self.pending.pop(job.id, None)
        if not recorded:
            log.warning("lease lost before recording", extra={"job_id": job.id, "batch_id": job.batch_id})
        return int(recorded)

    def fail_pending(self, error: str) -> None:
        if self.pending:
            self.repo.record_failure(list(self.pending), self.worker, error)

    def release_pending(self, error: str) -> None:
        if self.pending:
            self.repo.release(list(self.pending), self.worker, error)


@app.task(name=RENDER_TASK, bind=True)
def render_chunk(self, batch_id: str, job_ids: list[str]) -> dict:
    worker = self.request.hostname or f"local-{os.getpid()}"
    run = ChunkRun(batch_id, worker)
    try:
        return run.run(job_ids)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if is_transient(exc) and self.request.retries < MAX_TASK_RETRIES:
            log.warning("transient failure, retrying", extra={"batch_id": batch_id, "error": reason,
                                                               "retries": self.request.retries})
            _safely(run.release_pending, reason)
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries), max_retries=MAX_TASK_RETRIES)
        log.error("chunk failed", extra={"batch_id": batch_id, "error": reason, "jobs": len(run.pending)})
        _safely(run.fail_pending, reason)
        if isinstance(exc, LcmqError):
            return {"failed": len(run.pending), "error": reason}
        raise


def _safely(action, reason: str) -> None:
    try:
        action(reason)
    except LcmqError as exc:  # the database is gone too; the lease lets the sweeper recover
        log.error("could not record the outcome", extra={"error": str(exc), "reason": reason})
