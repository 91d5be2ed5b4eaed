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
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from lcmq.errors import LcmqError, ModelLoadError, is_transient
from lcmq.manifest import write_manifest
from lcmq.profiles import get_profile
from lcmq.queue import RENDER_TASK, get_app, publish_chunks
from lcmq.repository import BatchRecord, JobRecord, Repository, StoredImage
from lcmq.settings import get_settings
from lcmq.storage import Storage, sha256_hex, storage_from_settings

from worker.encode import encode_job
from worker.img2img import load_init_images
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


# Encoding and uploading overlap the rendering of the next micro-batch. Each image is encoded
# and uploaded on its own in a small pool, fed continuously across micro-batch boundaries (no
# drain between them); one recorder thread records each micro-batch, in order, once all of its
# uploads are done. At most STORING_MICRO_BATCHES wait on them: backpressure on the render loop.
_RECORDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcmq-record")
_UPLOADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lcmq-upload")
STORING_MICRO_BATCHES = 2


class ChunkRun:
    """One task's work over its jobs.

    Jobs are claimed one micro-batch at a time: a crash costs an attempt only to the jobs that
    were being rendered or stored, and the redelivered message finds the rest still queued.
    `held` maps the claimed jobs not yet final (rendering, or storing) for lease renewal and
    hand-back; the heartbeat thread reads it, the recorder thread shrinks it.
    """

    def __init__(self, batch_id: str, worker: str):
        self.settings = get_settings()
        self.batch_id = batch_id
        self.worker = worker
        self.repo, self.storage = process_clients()
        self.held: dict[str, JobRecord] = {}
        self._held_lock = threading.Lock()
        self._storing: deque[tuple[Future, list[JobRecord]]] = deque()  # oldest first
        self.succeeded = 0
        # Where the chunk's time went, in ms (the upload and recorder threads add their parts).
        self.timings = {"claim_ms": 0.0, "render_ms": 0.0, "wait_store_ms": 0.0, "encode_ms": 0.0,
                        "upload_ms": 0.0, "record_ms": 0.0}

    def _timed(self, part: str, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        with self._held_lock:  # the upload threads add their parts concurrently
            self.timings[part] += elapsed_ms

    # --- the chunk ------------------------------------------------------------------------

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
        claimed = 0
        with Heartbeat(self._renew_leases, self.settings.lease_s / 3):
            for start in range(0, len(job_ids), size):
                if shutting_down():
                    self._finish_storing()
                    self.hand_back(batch, job_ids[start:])
                    break
                # Jobs already taken, done or canceled are skipped by the claim itself.
                started = time.perf_counter()
                group = self.repo.claim(job_ids[start:start + size], self.worker, self.settings.lease_s)
                self._timed("claim_ms", started)
                self._hold(group)
                claimed += len(group)
                for same_shape in micro_batches(group, size):
                    self._render_then_store(loaded, batch, same_shape)
            self._finish_storing()
        log.info("chunk done", extra={"batch_id": self.batch_id, "jobs": len(job_ids), "claimed": claimed,
                                      "succeeded": self.succeeded, "worker": self.worker, "pid": os.getpid(),
                                      **{k: round(v, 2) for k, v in self.timings.items()}})
        self._write_manifest()
        return {"claimed": claimed, "succeeded": self.succeeded}

    def _write_manifest(self) -> None:
        """After the chunk's last record: if that finished the batch, write its manifest.jsonl
        (one indexed query when it did not). A failure is left to the sweeper, not retried here."""
        try:
            write_manifest(self.repo, self.storage, self.batch_id)
        except Exception as exc:  # noqa: BLE001 - the images are recorded; the sweeper writes it later
            log.warning("manifest not written", extra={"batch_id": self.batch_id,
                                                       "error": f"{type(exc).__name__}: {exc}"})

    def hand_back(self, batch: BatchRecord, job_ids: list[str]) -> None:
        """Shutdown: the jobs not yet claimed go back to the queue in a message of their own."""
        publish_chunks(batch.profile, [(batch.id, job_ids)], batch.priority)
        log.info("worker stopping, jobs handed back", extra={"batch_id": batch.id, "jobs": len(job_ids)})

    # --- holding jobs -----------------------------------------------------------------------

    def _hold(self, jobs: list[JobRecord]) -> None:
        with self._held_lock:
            self.held.update((job.id, job) for job in jobs)

    def _drop(self, jobs: list[JobRecord]) -> None:
        with self._held_lock:
            for job in jobs:
                self.held.pop(job.id, None)

    def held_ids(self) -> list[str]:
        with self._held_lock:
            return list(self.held)

    def _renew_leases(self) -> None:
        if ids := self.held_ids():
            self.repo.extend_leases(ids, self.worker, self.settings.lease_s)

    def _fail_jobs(self, jobs: list[JobRecord], reason: str) -> None:
        log.error("micro-batch failed", extra={"batch_id": self.batch_id, "jobs": len(jobs), "error": reason})
        self.repo.record_failure([job.id for job in jobs], self.worker, reason)
        self._drop(jobs)

    def _fail_now(self, job_ids: list[str], reason: str) -> int:
        claimed = self.repo.claim(job_ids, self.worker, self.settings.lease_s)
        log.error("jobs failed", extra={"batch_id": self.batch_id, "jobs": len(claimed), "error": reason})
        return self.repo.record_failure([job.id for job in claimed], self.worker, reason)

    # --- render, then store in the background -----------------------------------------------

    def _render_then_store(self, loaded, batch: BatchRecord, group: list[JobRecord]) -> None:
        """Transient faults propagate (the task retries); anything else fails that micro-batch only."""
        try:
            maybe_crash([job.prompt for job in group])
            group, init_images = self._init_images(loaded, group)
            if not group:
                return
            warnings = truncation_warnings(loaded, [job.prompt for job in group])
            started = time.perf_counter()
            images = render(loaded, group, init_images)
            self._timed("render_ms", started)
            render_ms = round((time.perf_counter() - started) * 1000 / len(group), 2)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._fail_jobs(group, f"{type(exc).__name__}: {exc}")
            return
        started = time.perf_counter()
        while len(self._storing) >= STORING_MICRO_BATCHES:  # backpressure
            self._finish_oldest()
        self._timed("wait_store_ms", started)
        uploads = [_UPLOADS.submit(self._upload, batch, job, image, warning, render_ms, len(group))
                   for job, image, warning in zip(group, images, warnings, strict=True)]
        self._storing.append((_RECORDER.submit(self._record, group, uploads), group))

    def _init_images(self, loaded, group: list[JobRecord]):
        """img2img: read and check each job's init image; a bad one fails its own job only."""
        if loaded.dtype is None:  # the null renderer draws no image from them
            return group, None
        ready, images, bad = load_init_images(group, self.settings)
        for job, reason in bad:
            self._fail_jobs([job], reason)
        return ready, images

    def _finish_oldest(self) -> None:
        future, group = self._storing.popleft()
        try:
            self.succeeded += future.result()
        except Exception as exc:
            if is_transient(exc):
                raise
            self._fail_jobs([job for job in group if job.id in self.held], f"{type(exc).__name__}: {exc}")

    def _finish_storing(self) -> None:
        while self._storing:
            self._finish_oldest()

    def _upload(self, batch: BatchRecord, job: JobRecord, image, warning: str | None, render_ms: float,
                batch_size: int) -> StoredImage:
        """Encode and upload one image (an identical object already there counts as uploaded)."""
        started = time.perf_counter()
        data, content_type, ext = encode_job(image, job, batch)  # in the batch's format
        digest = sha256_hex(data)
        self._timed("encode_ms", started)
        started = time.perf_counter()
        # Catalog items have a stable key, set by the producer; other jobs one made of ids.
        key = job.key or self.storage.batch_key(job.batch_id, job.index, ext)
        # Keys are deterministic: an earlier attempt that uploaded and then died left this very
        # object (only a retried job can find one, so first attempts skip the check).
        if job.attempts == 1 or self.storage.stored_sha256(key) != digest:
            self.storage.put(key, data, content_type, {"job-id": job.id, "batch-id": job.batch_id,
                                                       "seed": str(job.seed), "sha256": digest})
        self._timed("upload_ms", started)
        return StoredImage(job.id, key, digest, render_ms, batch_size, warning)

    def _record(self, group: list[JobRecord], uploads: list[Future]) -> int:
        """Record a micro-batch once all its uploads are done; returns how many were recorded.
        The first failed upload fails (or, if transient, hands back) the whole micro-batch."""
        stored = [upload.result() for upload in uploads]
        started = time.perf_counter()
        recorded = self.repo.record_successes(stored, self.worker)
        self._timed("record_ms", started)
        self._drop(group)
        if recorded < len(stored):
            log.warning("leases lost before recording", extra={"batch_id": self.batch_id,
                                                               "lost": len(stored) - recorded})
        return recorded

    # --- after a failure ----------------------------------------------------------------------

    def abandon_storing(self) -> None:
        """Let background stores finish (or fail) before the held jobs are released or failed."""
        while self._storing:
            future, _ = self._storing.popleft()
            try:
                self.succeeded += future.result()
            except Exception:  # noqa: BLE001 - its jobs are still held and handled by the caller
                pass

    def fail_pending(self, error: str) -> None:
        self.abandon_storing()
        if ids := self.held_ids():
            self.repo.record_failure(ids, self.worker, error)

    def release_pending(self, error: str) -> None:
        self.abandon_storing()
        if ids := self.held_ids():
            self.repo.release(ids, self.worker, error)


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
        log.error("chunk failed", extra={"batch_id": batch_id, "error": reason, "jobs": len(run.held)})
        _safely(run.fail_pending, reason)
        if isinstance(exc, LcmqError):
            return {"failed": len(run.held), "error": reason}
        raise


def _safely(action, reason: str) -> None:
    try:
        action(reason)
    except LcmqError as exc:  # the database is gone too; the lease lets the sweeper recover
        log.error("could not record the outcome", extra={"error": str(exc), "reason": reason})
