"""The sweeper: puts back what crashes left behind. Safe to run anywhere, any number of times.

1. Running jobs whose lease expired (their worker died): requeue them, or fail them once they
   have taken down `max_attempts` workers.
2. Jobs requeued without a message (step 1's, or a resume that crashed): publish them. Batches
   not published `dispatch_grace_s` after their commit (a crash between the submit's commit and
   its publish): publish them.
3. Queued jobs whose message is older than `redispatch_s` while their queue is empty: the
   message was lost (a broker restart without its append-only file): publish again.
A duplicate message is harmless: the worker's claim finds the job taken and does nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from lcmq.errors import LcmqError
from lcmq.queue import queue_length
from lcmq.repository import Repository, utcnow
from lcmq.settings import Settings

from scheduler.dispatch import dispatch_batch, publish_batch

log = logging.getLogger("lcmq.sweeper")


@dataclass(frozen=True)
class SweepReport:
    requeued: int = 0
    failed: int = 0
    dispatched: int = 0
    redispatched: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"requeued": self.requeued, "failed": self.failed, "dispatched": self.dispatched,
                "redispatched": self.redispatched}


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

    report = SweepReport(requeued, failed, dispatched, redispatched)
    if any(report.to_dict().values()):
        log.warning("sweep recovered jobs", extra=report.to_dict())
    return report


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
