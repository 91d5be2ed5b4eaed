"""Producer side: turn validated job specs into a batch, its job rows and its queue messages.

1. Resolve every job's seed (explicit, or derived from the batch seed and the row index).
2. Write the batch and all its jobs in one transaction (or find the batch that an identical
   submission already wrote: the idempotency key).
3. Dispatch: chunk the jobs by render shape so each chunk is one pipeline call, and publish.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import asdict

from lcmq.errors import BrokerError
from lcmq.profiles import Profile
from lcmq.repository import PendingJob, Repository
from lcmq.spec import SEED_BITS, BatchOptions, JobSpec
from lcmq.storage import Storage

from scheduler.dispatch import chunk_size_for, publish_batch
from scheduler.inputs import InputUploads

log = logging.getLogger("lcmq.scheduler")

KEEP_PENDING_UP_TO = 250_000


def new_batch_id() -> str:
    return uuid.uuid4().hex[:16]


def job_id(batch_id: str, index: int) -> str:
    """A job's id: its batch's id and its row index (unique, and cheap for 10^6 rows)."""
    return f"{batch_id}{index:016x}"


def derive_seed(batch_seed: int, index: int) -> int:
    """A job's seed when the row gives none: stable for the same batch seed and row."""
    digest = hashlib.sha256(f"{batch_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[: SEED_BITS // 8], "big")


def job_row(job_id: str, spec: JobSpec, batch_seed: int) -> dict:
    seed = spec.seed if spec.seed is not None else derive_seed(batch_seed, spec.index if spec.row is None else spec.row)
    return {"id": job_id, "index": spec.index, "prompt": spec.prompt, "negative_prompt": spec.negative_prompt,
            "seed": seed, "steps": spec.steps, "guidance": spec.guidance, "width": spec.width,
            "height": spec.height, "meta": spec.metadata, "loras": list(spec.loras) or None,
            "init_image": spec.init_image, "strength": spec.strength}


def create_and_enqueue(specs: Iterable[JobSpec], profile: Profile, options: BatchOptions, repo: Repository,
                       storage: Storage, chunk_size: int, idempotency_key: str | None = None,
                       priority: int = 0, max_chunks: int = 1000) -> tuple[str, bool]:
    """Write a validated batch and publish its chunks; returns (batch id, created).

    `specs` may be a stream (a 10^6-row file is never held whole). When the idempotency key
    names an existing batch, nothing is written or published and that batch's id is returned.
    """
    batch_id = new_batch_id()
    batch_seed = options.seed if options.seed is not None else secrets.randbelow(2**SEED_BITS)
    # What publishing needs is kept while the rows are written, up to a bound; a longer batch
    # is read back from the database page by page (memory stays flat for 10^7 rows).
    kept: list[PendingJob] | None = []
    uploads = InputUploads(storage, batch_id)

    def rows():
        nonlocal kept
        for spec in specs:
            row = job_row(job_id(batch_id, spec.index), spec, batch_seed)
            if spec.upload_init:  # a local init image: workers read it from storage
                row["init_image"] = uploads.url_for(spec.init_image)
            if kept is not None:
                kept.append(PendingJob(row["id"], batch_id, spec.render_shape, 0))
                if len(kept) > KEEP_PENDING_UP_TO:
                    kept = None
            yield row

    # 1-2. One transaction: a reader sees the whole batch or none of it.
    try:
        batch_id, created = repo.create_batch(
            {"id": batch_id, "name": options.name, "profile": profile.name, "total": 0, "seed": batch_seed,
             "output": storage.batch_url(batch_id), "options": asdict(options),
             "idempotency_key": idempotency_key, "priority": priority},
            rows())
    except BaseException:
        uploads.discard()  # nothing was written: the init images uploaded so far go too
        raise
    batch = repo.get_batch(batch_id)
    try:
        if not created:
            # The same submission again: render nothing new, but publish whatever the first one
            # committed and could not publish (a retry after "broker unreachable" heals the batch).
            published = publish_batch(repo, batch, chunk_size) if batch.published_at is None else 0
            log.info("identical batch exists", extra={"batch_id": batch_id, "published": published})
            return batch_id, False
        # 3. Publish after the commit, so a worker never receives ids it cannot read yet. A crash
        #    here leaves the batch unpublished; the sweeper publishes it after its grace period.
        published = publish_batch(repo, batch, chunk_size_for(batch.total, chunk_size, max_chunks), kept)
    except BrokerError as exc:
        raise BrokerError(f"batch {batch_id} is saved, but its messages could not be published ({exc}); "
                          f"the sweeper publishes them, or run `lcmq resume {batch_id}`") from exc
    log.info("batch enqueued", extra={"batch_id": batch_id, "jobs": published, "profile": profile.name})
    return batch_id, True
