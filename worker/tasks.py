"""The render task: a chunk of job ids, rendered in micro-batches, uploaded, recorded.

1. Get this process's pinned pipeline (loaded once, at start or on the first task).
2. For each micro-batch of the chunk: stop and hand the rest back if the worker is shutting
   down; claim the micro-batch's free jobs (a conditional update: jobs already taken, done or
   canceled are skipped, so redelivered or duplicate messages do nothing) and renew their
   leases while working; render; hand the images to the process's store pipeline
   (worker/store.py), which encodes them with their parameters, uploads them under a key made
   of ids (an object already there with the same sha256 counts as uploaded) and records key,
   sha256 and timing in the row, only while this worker still holds the job — in the
   background, overlapping the next micro-batch, and the next task.
Transient faults hand the unfinished jobs back and retry the task with backoff and jitter;
permanent ones fail the affected jobs at once with the reason stored.
"""

from __future__ import annotations

import logging
import os
import time

from lcmq.errors import LcmqError, ModelLoadError, StorageError, is_transient
from lcmq.profiles import get_profile
from lcmq.queue import RENDER_TASK, get_app, publish_chunks
from lcmq.repository import BatchRecord, JobRecord, Repository
from lcmq.settings import get_settings
from lcmq.storage import Storage, storage_from_settings
from worker.control import load_control_images
from worker.img2img import load_init_images
from worker.leases import handback_delay_s
from worker.lifecycle import shutting_down
from worker.memory import PeakMemory
from worker.pipeline import pinned_pipeline, truncation_warnings
from worker.render import micro_batches, render
from worker.store import Outcome, StoreContext, pipeline

log = logging.getLogger("lcmq.worker")
app = get_app()

WORKER_PROFILE_ENV = "LCMQ_WORKER_PROFILE"
MAX_TASK_RETRIES = 8


_CLIENTS: dict[int, tuple[Repository, Storage]] = {}


def process_clients() -> tuple[Repository, Storage]:
    """This process's repository and storage client, built once (an S3 client costs ~0.1 s)."""
    pid = os.getpid()
    if pid not in _CLIENTS:
        settings = get_settings()
        _CLIENTS[pid] = (Repository(settings.database_url_resolved), storage_from_settings(settings))
    return _CLIENTS[pid]


def claim_step(batch: BatchRecord, micro_batch: int, chunk: int) -> int:
    """How many of a chunk's jobs one claim covers: a micro-batch, so that a crash costs an
    attempt only to the jobs being rendered. A canceled batch's queued jobs are canceled already
    (the claim finds none, or a job the sweeper put back): one claim for the whole chunk, not a
    round trip per micro-batch for nothing, so its messages drain at once."""
    return chunk if batch.canceled_at is not None else micro_batch


class ChunkRun:
    """One task's work over its jobs.

    Jobs are claimed one micro-batch at a time: a crash costs an attempt only to the jobs that
    were being rendered or stored, and the redelivered message finds the rest still queued.
    Claimed jobs are in the process's lease ledger (worker/leases.py), held by this run until
    it hands them to the store pipeline (which settles them, even after this task returned);
    a failure here releases or fails only the jobs this run still holds.
    """

    def __init__(self, batch_id: str, worker: str):
        self.settings = get_settings()
        self.batch_id = batch_id
        self.worker = worker
        self.repo, self.storage = process_clients()
        self.store = pipeline(self.settings.lease_s)
        self.leases = self.store.leases
        self.next_start = 0  # position in the chunk of the first job not yet claimed
        self.succeeded = 0
        self._timings_before = self.store.timings_snapshot()
        self.render_peak_mb: float | None = None  # the highest micro-batch peak (worker/memory.py)

    def held_ids(self) -> list[str]:
        """The jobs this run claimed and has not handed to the store pipeline nor settled."""
        return self.leases.held_by(self)

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
        context = StoreContext(self.repo, self.storage, self.worker, batch, self.settings.max_handbacks)
        size = loaded.batch_size or self.settings.batch_size  # smaller when --max-memory probed it
        claim_size = claim_step(batch, size, len(job_ids))
        claimed = 0
        for start in range(0, len(job_ids), claim_size):
            self.next_start = start
            if shutting_down():
                self.hand_back(batch, job_ids[start:])
                break
            # Jobs already taken, done or canceled are skipped by the claim itself.
            started = time.perf_counter()
            group = self.leases.claim(
                self.repo, self.worker, job_ids[start : start + claim_size], self, self.settings.max_attempts
            )
            self.store.add_time("claim_ms", started)
            self.next_start = start + claim_size
            claimed += len(group)
            if any(job.attempts > 1 for job in group):
                # A retried job may be a poison one (it took a worker down before): nothing
                # of another job may be storing in this process when it renders.
                self._absorb(self.store.drain())
            for same_shape in micro_batches(group, size):
                self._render_then_store(loaded, context, same_shape)
        else:
            self.next_start = len(job_ids)
        self.store.finish_chunk(context)  # the manifest, if this chunk finished the batch
        if shutting_down():  # the process is about to exit: nothing may be left storing
            self._absorb(self.store.drain())
        # The last micro-batches are still storing: the next task renders meanwhile.
        timings = self.store.timings_snapshot()
        log.info(
            "chunk done",
            extra={
                "batch_id": self.batch_id,
                "jobs": len(job_ids),
                "claimed": claimed,
                "succeeded": self.succeeded,
                "storing": self.store.held_count(),
                "worker": self.worker,
                "pid": os.getpid(),
                "batch_size": size,
                "render_peak_mb": self.render_peak_mb,
                **{k: round(timings[k] - self._timings_before[k], 2) for k in timings},
            },
        )
        return {"claimed": claimed, "succeeded": self.succeeded}

    def hand_back(self, batch: BatchRecord, job_ids: list[str]) -> None:
        """Shutdown: the jobs not yet claimed go back to the queue in a message of their own."""
        publish_chunks(batch.profile, [(batch.id, job_ids)], batch.priority)
        log.info("worker stopping, jobs handed back", extra={"batch_id": batch.id, "jobs": len(job_ids)})

    def remaining_ids(self, job_ids: list[str]) -> list[str]:
        """What a retry of this task must cover: the jobs being rendered and those not claimed
        yet (the ones in the store pipeline are settled there)."""
        return self.held_ids() + job_ids[self.next_start :]

    # --- settling jobs ----------------------------------------------------------------------

    def _fail_jobs(self, jobs: list[JobRecord], reason: str) -> None:
        log.error("micro-batch failed", extra={"batch_id": self.batch_id, "jobs": len(jobs), "error": reason})
        self.leases.fail([job.id for job in jobs], reason)

    def _fail_now(self, job_ids: list[str], reason: str) -> int:
        claimed = self.leases.claim(self.repo, self.worker, job_ids, self)
        log.error("jobs failed", extra={"batch_id": self.batch_id, "jobs": len(claimed), "error": reason})
        return self.leases.fail([job.id for job in claimed], reason)

    # --- render, then store in the background -----------------------------------------------

    def _render_then_store(self, loaded, context: StoreContext, group: list[JobRecord]) -> None:
        """Transient faults propagate (the task retries); anything else fails that micro-batch only."""
        try:
            group, init_images, control_images = self._init_images(loaded, group)
            if not group:
                return
            warnings = truncation_warnings(loaded, [job.prompt for job in group])
            started = time.perf_counter()
            with PeakMemory(loaded.device) as peak:
                images = render(loaded, group, init_images, control_images)
            self.store.add_time("render_ms", started)
            if peak.mb is not None:
                self.render_peak_mb = max(self.render_peak_mb or 0.0, peak.mb)
            render_ms = round((time.perf_counter() - started) * 1000 / len(group), 2)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._fail_jobs(group, f"{type(exc).__name__}: {exc}")
            return
        started = time.perf_counter()
        outcomes = self.store.make_room()  # backpressure
        self.store.add_time("wait_store_ms", started)
        self.store.submit(context, group, images, warnings, render_ms)  # the store pipeline holds them now
        self._absorb(outcomes)

    def _absorb(self, outcomes: list[Outcome]) -> None:
        """Count what was stored; a transient storing fault stops this task (its jobs were
        handed back by the pipeline) so that the rest of the chunk retries after a backoff."""
        self.succeeded += sum(outcome.recorded for outcome in outcomes)
        if errors := [outcome.transient_error for outcome in outcomes if outcome.transient_error]:
            raise StorageError(f"storing failed: {errors[0]}")

    def _init_images(self, loaded, group: list[JobRecord]):
        """img2img and controls: read and check each job's init and control images; a bad one
        fails its own job only."""
        if loaded.dtype is None:  # the null renderer draws no image from them
            return group, None, None
        ready, images, bad = load_init_images(group, self.settings)
        ready_too, controls, bad_control = load_control_images(ready, self.settings)
        if images is not None and len(ready_too) != len(ready):  # keep init images in step
            by_id = {job.id: image for job, image in zip(ready, images, strict=True)}
            images = [by_id[job.id] for job in ready_too]
        for job, reason in bad + bad_control:
            self._fail_jobs([job], reason)
        return ready_too, images, controls

    # --- after a failure ----------------------------------------------------------------------

    def fail_pending(self, error: str) -> None:
        if ids := self.held_ids():
            self.leases.fail(ids, error)

    def release_pending(self, error: str) -> int:
        """Hand the jobs held back (failing those handed back too often); their hand-back count,
        which the retry's backoff grows with."""
        if not (ids := self.held_ids()):
            return 0
        handed = self.leases.hand_back(ids, error, self.settings.max_handbacks)
        if handed.failed:
            log.error(
                "jobs failed: handed back too often",
                extra={"batch_id": self.batch_id, "jobs": len(handed.failed), "error": error},
            )
        return handed.handbacks

    def let_go(self) -> None:
        """The task is over: what it still holds (a settle that failed) is left to its lease,
        which now runs out, and to the sweeper."""
        self.leases.drop(self.held_ids())


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
            log.warning(
                "transient failure, retrying",
                extra={"batch_id": batch_id, "error": reason, "retries": self.request.retries},
            )
            remaining = run.remaining_ids(job_ids)  # before the hand-back lets go of the held jobs
            handbacks = _safely(run.release_pending, reason) or 0
            delay_s = handback_delay_s(max(self.request.retries + 1, handbacks))
            raise self.retry(
                args=[batch_id, remaining], exc=exc, countdown=delay_s, max_retries=MAX_TASK_RETRIES
            ) from exc
        # Out of retries, or a fault outside the render loop: fail the jobs held, keep the rest
        # queued for the sweeper's redispatch.
        held = len(run.held_ids())
        log.error("chunk failed", extra={"batch_id": batch_id, "error": reason, "jobs": held})
        _safely(run.fail_pending, reason)
        if isinstance(exc, LcmqError):
            return {"failed": held, "error": reason}
        raise
    finally:
        run.let_go()


def _safely(action, reason: str):
    """The action's result; None when the database is gone too (the leases let the sweeper recover)."""
    try:
        return action(reason)
    except LcmqError as exc:
        log.error("could not record the outcome", extra={"error": str(exc), "reason": reason})
        return None
