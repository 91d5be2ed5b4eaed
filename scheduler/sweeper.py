"""The sweeper: puts back what crashes left behind. Safe to run anywhere, any number of times.

1. Running jobs whose lease expired (their worker died): requeue them, or fail them once they
   have taken down `max_attempts` workers.
2. Jobs requeued without a message (step 1's, or a resume that crashed): publish them. Batches
   not published `dispatch_grace_s` after their commit (a crash between the submit's commit and
   its publish): publish them.
3. Queued jobs whose message is older than `redispatch_s` while their queue is empty: the
   message was lost (a broker restart without its append-only file): publish again.
A duplicate message is harmless: the worker's claim finds the job taken and does nothing.
4. Finished batches without a current manifest.jsonl `manifest_grace_s` after their last job
   (its worker died between recording and writing it): write it, a few batches per pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from lcmq.errors import LcmqError
from lcmq.manifest import write_manifest
from lcmq.queue import queue_length
from lcmq.repository import Repository, utcnow
from lcmq.settings import Settings
from lcmq.storage import storage_from_settings
from scheduler.dispatch import dispatch_batch, publish_batch

log = logging.getLogger("lcmq.sweeper")

# Manifests written per pass: a backlog (a fresh upgrade, 10^6-row batches) must not hold up
# the recovery of jobs, which is the sweeper's first duty.
MANIFESTS_PER_SWEEP = 10


@dataclass(frozen=True)
class SweepReport:
    requeued: int = 0
    failed: int = 0
    dispatched: int = 0
    redispatched: int = 0
    manifests: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "requeued": self.requeued,
            "failed": self.failed,
            "dispatched": self.dispatched,
            "redispatched": self.redispatched,
            "manifests": self.manifests,
        }


def _batches_of(repo: Repository, **filters) -> list[str]:
    return sorted({job.batch_id for job in repo.pending_dispatch(**filters)})


def sweep_once(repo: Repository, settings: Settings) -> SweepReport:
    now = utcnow()
    # 1. Dead workers' jobs.
    requeued, failed = repo.recover_expired(settings.max_attempts)

    # 2. Jobs without a message: requeued ones at once, unpublished batches after the grace.
    dispatched = 0
    for batch_id in _batches_of(repo):
        dispatched += dispatch_batch(repo, repo.get_batch(batch_id), settings.chunk_size)
    for batch_id in repo.unpublished_batches(now - timedelta(seconds=settings.dispatch_grace_s)):
        dispatched += publish_batch(repo, repo.get_batch(batch_id), settings.chunk_size)

    # 3. Jobs whose message was lost with the broker's memory.
    redispatched = 0
    stale_cutoff = now - timedelta(seconds=settings.redispatch_s)
    empty_queue: dict[str, bool] = {}
    for batch_id in _batches_of(repo, dispatched_before=stale_cutoff):
        batch = repo.get_batch(batch_id)
        if batch.profile not in empty_queue:
            empty_queue[batch.profile] = queue_length(batch.profile) == 0
        if empty_queue[batch.profile]:
            redispatched += dispatch_batch(repo, batch, settings.chunk_size, dispatched_before=stale_cutoff)

    # 4. Manifests of finished batches that nobody wrote.
    manifests = write_due_manifests(repo, settings, now)

    report = SweepReport(requeued, failed, dispatched, redispatched, manifests)
    if requeued or failed or dispatched or redispatched:
        log.warning("sweep recovered jobs", extra=report.to_dict())
    return report


def write_due_manifests(repo: Repository, settings: Settings, now) -> int:
    due = repo.finished_batches_needing_manifest(
        now - timedelta(seconds=settings.manifest_grace_s), limit=MANIFESTS_PER_SWEEP
    )
    if not due:
        return 0
    storage = storage_from_settings(settings)  # only now: an S3 client costs ~0.1 s
    written = 0
    for batch_id in due:
        try:
            written += write_manifest(repo, storage, batch_id)
        except LcmqError as exc:  # one batch's bucket gone must not stop the others, nor the sweep
            log.error("manifest not written", extra={"batch_id": batch_id, "error": str(exc)})
    if written:
        log.info("sweep wrote manifests", extra={"manifests": written})
    return written


def sweep_forever(repo: Repository, settings: Settings, every_s: float, stop=None) -> None:
    """Sweep every `every_s` seconds until `stop()` says so; a failed sweep is logged and retried."""
    import time

    while stop is None or not stop():
        try:
            sweep_once(repo, settings)
        except LcmqError as exc:
            log.error("sweep failed", extra={"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the process that recovers crashes must not crash
            log.exception("sweep failed unexpectedly", extra={"error": f"{type(exc).__name__}: {exc}"})
        time.sleep(every_s)
