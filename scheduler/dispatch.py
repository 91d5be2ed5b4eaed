"""Dispatch: publish messages for queued jobs that have none yet (the outbox relay).

Submit commits jobs with `dispatched_at` NULL, then calls `dispatch_batch`; the sweeper calls
the same code for jobs a crash left behind. Jobs that were tried before (attempts > 0) go out
one per message, so a job that kills its worker takes no innocent neighbours down with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from lcmq.queue import publish_chunks
from lcmq.repository import BatchRecord, PendingJob, Repository

log = logging.getLogger("lcmq.scheduler")

PAGE = 10_000


def chunk_pending(jobs: Sequence[PendingJob], chunk_size: int) -> list[tuple[str, list[str]]]:
    """(batch id, job ids) chunks of at most chunk_size, each of one batch and one render shape."""
    groups: dict[tuple, list[str]] = {}
    chunks: list[tuple[str, list[str]]] = []
    for job in jobs:
        if job.attempts > 0:
            chunks.append((job.batch_id, [job.id]))  # a retry travels alone
        else:
            groups.setdefault((job.batch_id, job.shape), []).append(job.id)
    for (batch_id, _), ids in groups.items():
        chunks.extend((batch_id, ids[i:i + chunk_size]) for i in range(0, len(ids), chunk_size))
    return chunks


def dispatch_batch(repo: Repository, batch: BatchRecord, chunk_size: int, *,
                   created_before: datetime | None = None, dispatched_before: datetime | None = None) -> int:
    """Publish every undispatched queued job of a batch, page by page; returns jobs published.

    Publish first, then mark: a crash in between publishes twice, which the workers' claim
    turns into a no-op; the other order could lose the message.
    """
    published = 0
    while True:
        pending = repo.pending_dispatch(batch_id=batch.id, created_before=created_before,
                                        dispatched_before=dispatched_before, limit=PAGE)
        if not pending:
            return published
        publish_chunks(batch.profile, chunk_pending(pending, chunk_size), batch.priority)
        repo.mark_dispatched([job.id for job in pending])
        published += len(pending)
        if len(pending) < PAGE:
            return published
