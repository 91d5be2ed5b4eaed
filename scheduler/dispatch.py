"""Dispatch: publish messages for queued jobs (the outbox relay).

Two markers say what still needs a message. A new batch is committed with `published_at` NULL;
`publish_batch` sends all its jobs and then sets it (one row, however many jobs). A requeued job
(sweeper, resume, retry) has `dispatched_at` NULL; `dispatch_batch` sends those and stamps them.
The sweeper calls both for whatever a crash left behind. Jobs that were tried before
(attempts > 0) go out one per message, so a job that kills its worker takes no innocent
neighbours down with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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
        chunks.extend((batch_id, ids[i : i + chunk_size]) for i in range(0, len(ids), chunk_size))
    return chunks


def chunk_size_for(total: int, chunk_size: int, max_chunks: int) -> int:
    """chunk_size, or more for a batch that would otherwise need more than max_chunks messages."""
    return max(chunk_size, -(-total // max_chunks))


def publish_batch(
    repo: Repository,
    batch: BatchRecord,
    chunk_size: int,
    jobs: Sequence[PendingJob] | None = None,
    *,
    chunks: Iterable[tuple[str, list[str]]] | None = None,
) -> int:
    """Publish every queued job of a new batch, then mark the batch published; returns jobs sent.

    `jobs` are the batch's jobs when the caller still holds them, or `chunks` its chunks as a
    stream (a submit: scheduler.batches.KeptPending), sent PAGE job ids at a time; otherwise the
    jobs are read page by page. Publish first, then mark: a crash in between publishes twice,
    which the workers' claim turns into a no-op; the other order could lose the messages.
    """
    published = 0
    if chunks is not None:
        page: list[tuple[str, list[str]]] = []
        in_page = 0
        for chunk in chunks:
            page.append(chunk)
            in_page += len(chunk[1])
            if in_page >= PAGE:  # a page of ids at a time, whatever the chunk size: flat memory
                publish_chunks(batch.profile, page, batch.priority)
                published, page, in_page = published + in_page, [], 0
        if page:
            publish_chunks(batch.profile, page, batch.priority)
            published += in_page
    elif jobs is not None:
        publish_chunks(batch.profile, chunk_pending(jobs, chunk_size), batch.priority)
        published = len(jobs)
    else:
        after = -1
        while page := repo.queued_jobs(batch.id, after_index=after, limit=PAGE):
            publish_chunks(batch.profile, chunk_pending([job for _, job in page], chunk_size), batch.priority)
            published += len(page)
            after = page[-1][0]
    repo.mark_published(batch.id)
    return published


def dispatch_batch(
    repo: Repository, batch: BatchRecord, chunk_size: int, *, dispatched_before: datetime | None = None
) -> int:
    """Publish a batch's requeued jobs (dispatched_at NULL, or with dispatched_before: older than
    that), page by page, and stamp them; returns jobs published. Publish first, then mark."""
    published = 0
    while True:
        pending = repo.pending_dispatch(batch_id=batch.id, dispatched_before=dispatched_before, limit=PAGE)
        if not pending:
            return published
        publish_chunks(batch.profile, chunk_pending(pending, chunk_size), batch.priority)
        repo.mark_dispatched([job.id for job in pending])
        published += len(pending)
        if len(pending) < PAGE:
            return published
