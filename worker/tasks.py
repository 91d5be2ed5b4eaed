"""The render task: a chunk of job ids, rendered in micro-batches, uploaded, recorded.

1. Get this process's pinned pipeline (loaded once, at start or on the first task).
2. For each micro-batch of the chunk: stop and hand the rest back if the worker is shutting
   down; claim the micro-batch's free jobs (a conditional update: jobs already taken, done or
   canceled are skipped, so redelivered or duplicate messages do nothing) and renew their
   leases while working; render; encode PNG with parameters; upload under a key made of ids
   (an object already there with the same sha256 counts as uploaded); record key, sha256 and
   timing in the row, only while this worker still holds the job.
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
    """One task's work over its jobs; `pending` holds the claimed jobs not yet final.

    Jobs are claimed one micro-batch at a time: a crash costs an attempt only to the jobs that
    were being rendered, and the redelivered message finds the rest still queued.
    """

    def __init__(self, batch_id: str, worker: str):
        self.settings = get_settings()
        self.batch_id = batch_id
        self.worker = worker
        self.repo, self.storage = process_clients()
        self.pending: dict[str, JobRecord] = {}

    def run(self, job_ids: list[str]) -> dict:
        batch = self.repo.get_batch(self.batch_id)
        served = os.environ.get(WORKER_PROFILE_ENV)
        if served and served != batch.profile:  # misrouted: send it where its profile is served
            publish_chunks(batch.profile, [(batch.id, job_ids)], batch.priority)
            log.warning("chunk for another profile forwarded", extra={"batch_id": batch.id, "profile": batch.profile})
            return {"claimed": 0, "succeeded": 0}
        try:
            loaded = pinned_pipeline(get_profile(batch.profile), self.settings)
        except ModelLoadError as exc:  # permanent: the chunk's jobs fail now, with the reason
            failed = self._fail_now(job_ids, f"{type(exc).__name__}: {exc}")
            return {"claimed": failed, "succeeded": 0}
        size = self.settings.batch_size
        claimed = succeeded = 0
        with Heartbeat(self._renew_leases, self.settings.lease_s / 3):
            for start in range(0, len(job_ids), size):
                if shutting_down():
                    self.hand_back(batch, job_ids[start:])
                    break
                # Jobs already taken, done or canceled are skipped by the claim itself.
                group = self.repo.claim(job_ids[start:start + size], self.worker, self.settings.lease_s)
                claimed += len(group)
                for same_shape in micro_batches(group, size):
                    succeeded += self._render_or_fail(loaded, batch, same_shape)
        log.info("chunk done", extra={"batch_id": self.batch_id, "jobs": len(job_ids), "claimed": claimed,
                                      "succeeded": succeeded, "worker": self.worker, "pid": os.getpid()})
        return {"claimed": claimed, "succeeded": succeeded}

    def _fail_now(self, job_ids: list[str], reason: str) -> int:
        claimed = self.repo.claim(job_ids, self.worker, self.settings.lease_s)
        log.error("jobs failed", extra={"batch_id": self.batch_id, "jobs": len(claimed), "error": reason})
        return self.repo.record_failure([job.id for job in claimed], self.worker, reason)

    def _render_or_fail(self, loaded, batch: BatchRecord, group: list[JobRecord]) -> int:
        """Transient faults propagate (the task retries); anything else fails this micro-batch only."""
        try:
            return self._render_and_store(loaded, batch, group)
        except Exception as exc:
            if is_transient(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
            log.error("micro-batch failed", extra={"batch_id": batch.id, "jobs": len(self.pending), "error": reason})
            self.fail_pending(reason)
            self.pending = {}
            return 0

    def _renew_leases(self) -> None:
        if self.pending:
            self.repo.extend_leases(list(self.pending), self.worker, self.settings.lease_s)

    def _render_and_store(self, loaded, batch: BatchRecord, group: list[JobRecord]) -> int:
        self.pending = {job.id: job for job in group}
        prompts = [job.prompt for job in group]
        maybe_crash(prompts)
        warnings = truncation_warnings(loaded, prompts)
        started = time.perf_counter()
        images = render(loaded, group)
        render_ms = (time.perf_counter() - started) * 1000 / len(group)
        return sum(self._store(job, image, batch.profile, render_ms, len(group), warning)
                   for job, image, warning in zip(group, images, warnings, strict=True))

    def hand_back(self, batch: BatchRecord, job_ids: list[str]) -> None:
        """Shutdown: the jobs not yet claimed go back to the queue in a message of their own."""
        publish_chunks(batch.profile, [(batch.id, job_ids)], batch.priority)
        log.info("worker stopping, jobs handed back", extra={"batch_id": batch.id, "jobs": len(job_ids)})

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
            # The held micro-batch goes back to the queue; the retried message covers it and
            # every job of the chunk not rendered yet.
            log.warning("transient failure, retrying", extra={"batch_id": batch_id, "error": reason,
                                                               "retries": self.request.retries})
            _safely(run.release_pending, reason)
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries), max_retries=MAX_TASK_RETRIES)
        # Out of retries, or a fault outside the render loop: fail the jobs held, keep the rest
        # queued for the sweeper's redispatch.
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
