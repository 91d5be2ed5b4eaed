"""The render loop both kinds of worker share: one micro-batch rendered, then handed to the
process's store pipeline (worker/store.py), which encodes, uploads and records it in the
background. It reaches jobs and objects only through the ports of the `StoreContext`
(worker/ports.py): it does not know whether it runs in a Celery task (direct adapters) or in an
edge worker (gateway adapters). The callers claim the jobs (in the lease ledger, held by the
caller's name) and decide what a transient fault means (a Celery retry, an edge backoff).
"""

from __future__ import annotations

import logging
import time

from lcmq.errors import StorageError, is_transient
from lcmq.repository import JobRecord
from lcmq.settings import Settings
from worker.control import load_control_images
from worker.counters import COUNTERS
from worker.img2img import load_init_images
from worker.memory import PeakMemory
from worker.pipeline import truncation_warnings
from worker.render import render
from worker.store import Outcome, StoreContext, StorePipeline

log = logging.getLogger("lcmq.worker")


class MicroBatchRenderer:
    """Renders micro-batches of jobs its caller holds in the store pipeline's lease ledger."""

    def __init__(self, store: StorePipeline, settings: Settings):
        self.store = store
        self.leases = store.leases
        self.settings = settings
        self.succeeded = 0  # recorded images, counted as their outcomes come back
        self.render_peak_mb: float | None = None  # the highest micro-batch peak (worker/memory.py)

    def render_then_store(self, loaded, context: StoreContext, group: list[JobRecord]) -> None:
        """Transient faults propagate (the caller hands the jobs back and backs off); anything
        else fails that micro-batch only."""
        try:
            group, init_images, control_images = self._input_images(loaded, context, group)
            if not group:
                return
            warnings = truncation_warnings(loaded, [job.prompt for job in group])
            started = time.perf_counter()
            with PeakMemory(loaded.device) as peak:
                images = render(loaded, group, init_images, control_images)
            self.store.add_time("render_ms", started)
            COUNTERS.rendered(len(images), time.perf_counter() - started, peak.mb)  # the worker's row and metrics
            if peak.mb is not None:
                self.render_peak_mb = max(self.render_peak_mb or 0.0, peak.mb)
            render_ms = round((time.perf_counter() - started) * 1000 / len(group), 2)
        except Exception as exc:
            if is_transient(exc):
                raise
            self.fail_jobs(context, group, f"{type(exc).__name__}: {exc}")
            return
        # A lease lost while rendering (an edge worker's renew no longer returned the job): the
        # job is another worker's now, its image is not stored.
        kept = [i for i, job in enumerate(group) if self.leases.holds(job.id)]
        if len(kept) < len(group):
            log.warning(
                "leases lost while rendering", extra={"batch_id": context.batch.id, "lost": len(group) - len(kept)}
            )
            group, images, warnings = [group[i] for i in kept], [images[i] for i in kept], [warnings[i] for i in kept]
            if not group:
                return
        started = time.perf_counter()
        outcomes = self.store.make_room()  # backpressure
        self.store.add_time("wait_store_ms", started)
        self.store.submit(context, group, images, warnings, render_ms)  # the store pipeline holds them now
        self.absorb(outcomes)

    def absorb(self, outcomes: list[Outcome]) -> None:
        """Count what was stored; a transient storing fault stops the caller (its jobs were
        handed back by the pipeline) so that it goes on only after a backoff."""
        self.succeeded += sum(outcome.recorded for outcome in outcomes)
        if errors := [outcome.transient_error for outcome in outcomes if outcome.transient_error]:
            raise StorageError(f"storing failed: {errors[0]}")

    def fail_jobs(self, context: StoreContext, jobs: list[JobRecord], reason: str) -> None:
        log.error("micro-batch failed", extra={"batch_id": context.batch.id, "jobs": len(jobs), "error": reason})
        self.leases.fail([job.id for job in jobs], reason)

    def _input_images(self, loaded, context: StoreContext, group: list[JobRecord]):
        """img2img and controls: read (through the object store) and check each job's init and
        control images; a bad one fails its own job only."""
        if loaded.dtype is None:  # the null renderer draws no image from them
            return group, None, None
        read = context.objects.read
        ready, images, bad = load_init_images(group, self.settings, read)
        ready_too, controls, bad_control = load_control_images(ready, self.settings, read)
        if images is not None and len(ready_too) != len(ready):  # keep init images in step
            by_id = {job.id: image for job, image in zip(ready, images, strict=True)}
            images = [by_id[job.id] for job in ready_too]
        for job, reason in bad + bad_control:
            self.fail_jobs(context, [job], reason)
        return ready_too, images, controls
