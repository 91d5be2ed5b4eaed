"""Storing rendered images in the background, across task boundaries.

A worker process renders micro-batch after micro-batch; encoding, uploading and recording them
must never make the renderer wait, not even at the end of a chunk (a chunk is often under a
second of GPU time, and draining its last micro-batch's PNGs before the next task could start
would idle the GPU for a large share of it). So storing belongs to the process, not the task:

- each image is encoded and uploaded on its own in a small pool, fed continuously;
- one recorder thread records each micro-batch, in order, once all its uploads are done, and
  settles a failure itself: a permanent one fails that micro-batch's jobs with the reason, a
  transient one (S3 or the database away) hands them back to the queue in a message of their own
  after a backoff that grows with the times they were handed back (past `max_handbacks` they
  fail instead). A task that has returned thus owes nothing to the micro-batches it left here;
- the jobs being stored stay leased: the pipeline holds them in the process's lease ledger
  (worker/leases.py), whose heartbeat renews them whichever task (or none) is running;
- backpressure: a task waits while `max_pending` micro-batches are in the pipeline;
- once per chunk, after its last record, the recorder writes the batch's manifest if that chunk
  finished the batch;
- a task drains the pipeline before it renders a retried job (one that may have killed a
  worker before), so a poison job never takes other jobs' stored images down with it;
- at shutdown the worker drains the pipeline before its process exits (a crash instead leaves
  the leases to expire, and the sweeper requeues those jobs: keys are deterministic, so the
  redone upload finds its object and nothing is stored twice).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from lcmq.errors import LcmqError, is_transient
from lcmq.repository import BatchRecord, JobRecord, StoredImage
from lcmq.storage import sha256_hex
from worker.encode import encode_job
from worker.leases import LeaseLedger, handback_delay_s, process_leases, stop_process_leases
from worker.ports import JobStore, ObjectStore

log = logging.getLogger("lcmq.worker")

UPLOAD_THREADS = 4  # at least: uploads wait on the network


def store_threads() -> int:
    """Encode-and-upload threads: at least one per core this process may use, since encoding (zlib,
    numpy, libwebp, libjpeg) releases the GIL and a fast GPU needs every core encoding."""
    from worker.threads import machine_cores

    return max(UPLOAD_THREADS, machine_cores())


TIMING_PARTS = ("claim_ms", "render_ms", "wait_store_ms", "encode_ms", "upload_ms", "record_ms")


@dataclass
class Outcome:
    """What became of one stored micro-batch."""

    recorded: int = 0
    transient_error: str | None = None  # set when the micro-batch was handed back


@dataclass
class StoreContext:
    """Where a micro-batch goes: the ports (the job store names the worker that holds its jobs), its batch."""

    jobs: JobStore
    objects: ObjectStore
    batch: BatchRecord
    max_handbacks: int  # a transient fault past this many hand-backs fails the jobs


@dataclass
class StorePipeline:
    """This process's storing machinery (one per process; see `pipeline()`)."""

    leases: LeaseLedger  # the process's: it holds the jobs being stored and renews their leases
    max_pending: int = 2
    _uploads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(store_threads(), thread_name_prefix="lcmq-upload")
    )
    _recorder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="lcmq-record")
    )
    _pending: deque[Future] = field(default_factory=deque)  # each micro-batch's record, oldest first
    _lock: threading.Lock = field(default_factory=threading.Lock)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_PARTS, 0.0))

    # --- bookkeeping ------------------------------------------------------------------------

    def add_time(self, part: str, started: float) -> None:
        with self._lock:  # upload threads add their parts concurrently
            self.timings[part] += (time.perf_counter() - started) * 1000

    def timings_snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.timings)

    def held_count(self) -> int:
        return self.leases.count(self)

    # --- the pipeline -----------------------------------------------------------------------

    def submit(self, ctx: StoreContext, group: list[JobRecord], images, warnings, render_ms: float) -> None:
        """Store a rendered micro-batch in the background (call `make_room` first)."""
        self.leases.hold(ctx.jobs, [job.id for job in group], self)
        uploads = [
            self._uploads.submit(self._upload, ctx, job, image, warning, render_ms, len(group))
            for job, image, warning in zip(group, images, warnings, strict=True)
        ]
        future = self._recorder.submit(self._record, ctx, group, uploads)
        with self._lock:
            self._pending.append(future)

    def finish_chunk(self, ctx: StoreContext) -> None:
        """A chunk handed in its last micro-batch: once its records are done (the recorder runs
        in order), write the batch's manifest if that finished the batch. One check per chunk."""
        self._recorder.submit(self._write_manifest, ctx)

    def make_room(self) -> list[Outcome]:
        """Backpressure: wait until fewer than `max_pending` micro-batches are in the pipeline."""
        return self._wait_below(self.max_pending)

    def drain(self) -> list[Outcome]:
        return self._wait_below(1)

    def _wait_below(self, limit: int) -> list[Outcome]:
        outcomes: list[Outcome] = []
        while True:
            with self._lock:
                if len(self._pending) < limit:
                    return outcomes
                oldest = self._pending.popleft()
            outcomes.append(oldest.result())  # _record never raises

    # --- in the pool threads ----------------------------------------------------------------

    def _upload(
        self, ctx: StoreContext, job: JobRecord, image, warning: str | None, render_ms: float, batch_size: int
    ) -> StoredImage:
        """Encode and upload one image (an identical object already there counts as uploaded)."""
        started = time.perf_counter()
        data, content_type, ext = encode_job(image, job, ctx.batch)  # in the batch's format
        digest = sha256_hex(data)
        self.add_time("encode_ms", started)
        started = time.perf_counter()
        # The contract's rule, shared with the edge gateway (a catalog item's key, or one of ids).
        key = ctx.objects.job_image_key(job.key, job.batch_id, job.index, ext)
        # Keys are deterministic: an earlier attempt that uploaded and then died left this very
        # object (only a retried job can find one, so first attempts skip the check).
        if job.attempts == 1 or ctx.objects.stored_sha256(key) != digest:
            ctx.objects.put(
                key,
                data,
                content_type,
                {"job-id": job.id, "batch-id": job.batch_id, "seed": str(job.seed), "sha256": digest},
            )
        self.add_time("upload_ms", started)
        return StoredImage(job.id, key, digest, render_ms, batch_size, warning, job.control)

    def _record(self, ctx: StoreContext, group: list[JobRecord], uploads: list[Future]) -> Outcome:
        """Record a micro-batch once all its uploads are done, or settle its failure (the first
        failed upload decides for the whole micro-batch). Never raises."""
        ids = [job.id for job in group]
        try:
            stored = [upload.result() for upload in uploads]
            started = time.perf_counter()
            recorded = self.leases.record(stored)
            self.add_time("record_ms", started)
            if recorded < len(stored):
                log.warning(
                    "leases lost before recording", extra={"batch_id": ctx.batch.id, "lost": len(stored) - recorded}
                )
            return Outcome(recorded=recorded)
        except Exception as exc:  # noqa: BLE001 - every failure is settled here, the task is gone
            return self._settle_failure(ctx, ids, exc)
        finally:
            self.leases.drop(ids)  # settled, or (the database away too) left to run out

    def _settle_failure(self, ctx: StoreContext, ids: list[str], exc: Exception) -> Outcome:
        reason = f"{type(exc).__name__}: {exc}"
        batch = ctx.batch
        try:
            if is_transient(exc):
                self._hand_back(ctx, ids, reason)
                return Outcome(transient_error=reason)
            failed = self.leases.fail(ids, reason)
            log.error("micro-batch failed", extra={"batch_id": batch.id, "jobs": failed, "error": reason})
            return Outcome()
        except LcmqError as settle_exc:  # the database or broker is gone too: leases expire, the
            # sweeper requeues the jobs
            log.error(
                "could not settle a failed micro-batch",
                extra={"batch_id": batch.id, "error": reason, "cause": str(settle_exc)},
            )
            return Outcome(transient_error=reason)

    def _hand_back(self, ctx: StoreContext, ids: list[str], reason: str) -> None:
        """Back to the queue, attempt not counted, in a message of their own after a backoff
        (no task is left to retry them); failed instead once handed back `max_handbacks` times."""
        batch = ctx.batch
        handed = self.leases.hand_back(ids, reason, ctx.max_handbacks)
        if handed.requeued:
            ctx.jobs.requeue(batch, handed.requeued, handback_delay_s(handed.handbacks))
            log.warning(
                "storing failed, jobs handed back",
                extra={
                    "batch_id": batch.id,
                    "jobs": len(handed.requeued),
                    "handbacks": handed.handbacks,
                    "error": reason,
                },
            )
        if handed.failed:
            log.error(
                "storing failed, jobs handed back too often failed",
                extra={"batch_id": batch.id, "jobs": len(handed.failed), "error": reason},
            )

    @staticmethod
    def _write_manifest(ctx: StoreContext) -> None:
        ctx.jobs.batch_stored(ctx.batch)  # never raises


_PIPELINES: dict[int, StorePipeline] = {}


def pipeline(lease_s: float = 120.0) -> StorePipeline:
    """This process's pipeline (a forked pool child builds its own: threads do not survive fork)."""
    pid = os.getpid()
    if pid not in _PIPELINES:
        _PIPELINES[pid] = StorePipeline(process_leases(lease_s))
    return _PIPELINES[pid]


def drain_on_exit(**_) -> None:
    """Worker shutdown: let every background store finish before the process exits, then stop
    the lease heartbeat (nothing is held any more)."""
    if (store := _PIPELINES.get(os.getpid())) is not None:
        outcomes = store.drain()
        if outcomes:
            log.info("stores drained at exit", extra={"micro_batches": len(outcomes)})
    stop_process_leases()
