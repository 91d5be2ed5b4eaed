"""Producer side: turn validated job specs into a batch, its job rows and its queue messages.

1. Resolve every job's seed (explicit, or derived from the batch seed and the row index).
2. Write the batch and all its jobs in one transaction.
3. Chunk the jobs by render shape so each chunk is one kind of pipeline call, and publish.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import asdict

from lcmq.profiles import Profile
from lcmq.queue import publish_chunks
from lcmq.repository import Repository
from lcmq.spec import BatchOptions, JobSpec
from lcmq.storage import Storage

log = logging.getLogger("lcmq.scheduler")

SEED_BITS = 32


def new_batch_id() -> str:
    return uuid.uuid4().hex[:16]


def derive_seed(batch_seed: int, index: int) -> int:
    """A job's seed when the row gives none: stable for the same batch seed and row."""
    digest = hashlib.sha256(f"{batch_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[: SEED_BITS // 8], "big")


def chunk_by_shape(jobs: Sequence[tuple[str, JobSpec]], chunk_size: int) -> list[list[str]]:
    """Job ids in chunks of at most chunk_size, each chunk of a single render shape."""
    by_shape: dict[tuple, list[str]] = {}
    for job_id, spec in jobs:
        by_shape.setdefault(spec.render_shape, []).append(job_id)
    return [ids[i:i + chunk_size] for ids in by_shape.values() for i in range(0, len(ids), chunk_size)]


def job_row(job_id: str, spec: JobSpec, batch_seed: int) -> dict:
    seed = spec.seed if spec.seed is not None else derive_seed(batch_seed, spec.index)
    return {"id": job_id, "index": spec.index, "prompt": spec.prompt, "negative_prompt": spec.negative_prompt,
            "seed": seed, "steps": spec.steps, "guidance": spec.guidance, "width": spec.width,
            "height": spec.height, "meta": spec.metadata}


def create_and_enqueue(specs: Sequence[JobSpec], profile: Profile, options: BatchOptions, repo: Repository,
                       storage: Storage, chunk_size: int) -> str:
    """Write a validated batch and publish its chunks; returns the batch id."""
    batch_id = new_batch_id()
    batch_seed = options.seed if options.seed is not None else secrets.randbelow(2**SEED_BITS)
    jobs = [(uuid.uuid4().hex, spec) for spec in specs]

    # 1-2. One transaction: a reader sees the whole batch or none of it.
    repo.create_batch(
        {"id": batch_id, "name": options.name, "profile": profile.name, "total": len(jobs), "seed": batch_seed,
         "output": storage.batch_url(batch_id), "options": asdict(options)},
        [job_row(job_id, spec, batch_seed) for job_id, spec in jobs])

    # 3. Publish after the commit, so a worker never receives ids it cannot read yet.
    chunks = chunk_by_shape(jobs, chunk_size)
    publish_chunks(profile.name, batch_id, chunks)
    log.info("batch enqueued", extra={"batch_id": batch_id, "jobs": len(jobs), "chunks": len(chunks),
                                      "profile": profile.name})
    return batch_id
