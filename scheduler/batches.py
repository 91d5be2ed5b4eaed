"""Producer side: turn validated job specs into a batch, its job rows and its queue messages,
in three phases (`create_and_enqueue`):

1. Check and stage (`stage_batch`): the batch row, and each job's row from its validated spec:
   its seed (explicit, or derived from the batch seed and the row index), its id, the stored
   URL of a local init image, and what publishing needs. Nothing leaves this process yet.
2. Write (`write_batch`): the batch and all its jobs in one transaction (or find the batch that
   an identical submission already wrote: the idempotency key); the staged init images are
   stored once every row has passed, before the commit.
3. Publish (`publish_written`): chunk the jobs by render shape so each chunk is one pipeline
   call, and publish after the commit (the outbox: the sweeper publishes what a crash left).

Validation streams into the write rather than finishing first: the rows are checked while
Postgres ingests the ones before them (COPY). Checking is most of a submit's time (4.9 s of the
6.8 s of bench/submit.py's 10^5 rows, measured on a busy machine); finishing it first would add
the COPY's own second or so, and hold every row (or spill them to disk) for 10^7-row files.
The init images still wait for every row: `url_for` only names them while the rows stream.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from lcmq.errors import BrokerError, DatabaseError
from lcmq.profiles import Profile
from lcmq.repository import Repository
from lcmq.spec import SEED_BITS, BatchOptions, JobSpec
from lcmq.storage import Storage
from scheduler.dispatch import chunk_size_for, publish_batch
from scheduler.inputs import InputUploads

log = logging.getLogger("lcmq.scheduler")

KEEP_RUNS_UP_TO = 100_000  # runs of one render shape (KeptPending): a few MB at most


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
    return {
        "id": job_id,
        "index": spec.index,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": seed,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "width": spec.width,
        "height": spec.height,
        "meta": spec.metadata,
        "loras": list(spec.loras) or None,
        "init_image": spec.init_image,
        "strength": spec.strength,
        "control": [{k: v for k, v in entry.items() if k != "upload"} for entry in spec.control] or None,
        "key": None,
        "render_key": None,
    }  # set for catalog jobs (scheduler.schedules)


class KeptPending:
    """What publishing needs of the new jobs, kept while their rows are staged: per render
    shape, the runs of consecutive row indexes. A new job's id is its batch id and its row index
    (job_id) and its attempts are 0, so the runs are all there is to know: a 10^7-row batch of
    one shape is one run, and memory stays flat however long the file. A batch whose shapes
    change so often that its runs pass `limit` is read back from the database page by page."""

    def __init__(self, batch_id: str, limit: int):
        self.batch_id = batch_id
        self.limit = limit
        self.runs: dict[tuple, list[list[int]]] | None = {}  # None: over the limit, read back instead
        self._count = 0

    def add(self, index: int, shape: tuple) -> None:
        if self.runs is None:
            return
        runs = self.runs.setdefault(shape, [])
        if runs and runs[-1][1] == index:  # the next row of the same shape: the run grows
            runs[-1][1] = index + 1
            return
        runs.append([index, index + 1])
        self._count += 1
        if self._count > self.limit:
            self.runs = None

    def chunks(self, chunk_size: int) -> Iterator[tuple[str, list[str]]]:
        """(batch id, job ids) chunks of at most chunk_size, each of one render shape, in row
        order within a shape (what scheduler.dispatch.chunk_pending makes of the same jobs)."""
        assert self.runs is not None  # the caller reads the batch back when over the limit
        for runs in self.runs.values():
            ids: list[str] = []
            for start, end in runs:
                for index in range(start, end):
                    ids.append(job_id(self.batch_id, index))
                    if len(ids) == chunk_size:
                        yield self.batch_id, ids
                        ids = []
            if ids:
                yield self.batch_id, ids


@dataclass
class StagedBatch:
    """Phase 1's result. `jobs` is a stream: each row is checked and staged as the write reads
    it, and `inputs` and `pending` fill up as it goes."""

    batch: dict[str, Any]  # the batch row
    jobs: Iterator[dict[str, Any]]  # the job rows (lcmq.repository.JobRecord's FROM_ROW fields)
    inputs: InputUploads  # local init images the rows name, stored by the write before it commits
    pending: KeptPending  # the new jobs' row indexes by render shape, for publishing

    @property
    def batch_id(self) -> str:
        return self.batch["id"]


def _staged_rows(
    specs: Iterable[JobSpec], batch_id: str, batch_seed: int, inputs: InputUploads, pending: KeptPending
) -> Iterator[dict[str, Any]]:
    for spec in specs:  # validated as it is read: a bad row raises here, and nothing commits
        row = job_row(job_id(batch_id, spec.index), spec, batch_seed)
        if spec.upload_init and spec.init_image:  # a local init image: workers read it from storage
            row["init_image"] = inputs.url_for(spec.init_image)
        for stored, entry in zip(row["control"] or (), spec.control, strict=True):
            if entry.get("upload"):  # a local control image: stored beside the init images
                stored["image"] = inputs.url_for(entry["image"])
        pending.add(spec.index, spec.render_shape)
        yield row


def stage_batch(
    specs: Iterable[JobSpec],
    profile: Profile,
    options: BatchOptions,
    storage: Storage,
    idempotency_key: str | None = None,
    priority: int = 0,
    owner: str | None = None,
    webhook_url: str | None = None,
) -> StagedBatch:
    """Phase 1, check and stage: a new batch's row, and its job rows as a stream of `specs`."""
    batch_id = new_batch_id()
    batch_seed = options.seed if options.seed is not None else secrets.randbelow(2**SEED_BITS)
    batch = {
        "id": batch_id,
        "name": options.name,
        "profile": profile.name,
        "total": 0,
        "seed": batch_seed,
        "output": storage.batch_url(batch_id),
        "options": asdict(options),
        "idempotency_key": idempotency_key,
        "priority": priority,
        "owner": owner,
        "webhook_url": webhook_url,
    }
    inputs, pending = InputUploads(storage, batch_id), KeptPending(batch_id, KEEP_RUNS_UP_TO)
    return StagedBatch(batch, _staged_rows(specs, batch_id, batch_seed, inputs, pending), inputs, pending)


def write_batch(repo: Repository, staged: StagedBatch) -> tuple[str, bool]:
    """Phase 2, write: one transaction (COPY on Postgres). Returns (batch id, created); not
    created: an identical submission's batch, whose id comes back (nothing of this one stays)."""
    try:
        batch_id, created = repo.create_batch(staged.batch, staged.jobs, before_commit=staged.inputs.upload)
    except DatabaseError:
        # The connection was lost, perhaps around COMMIT: the batch may be committed, and its
        # jobs then need these inputs. Keep them: at worst unused files under an id no row names.
        raise
    except BaseException:
        staged.inputs.discard()
        raise
    if not created:
        # The inputs were stored under this submit's own batch id, which no committed row
        # names: delete them rather than leave them behind (see scheduler.inputs).
        staged.inputs.discard()
    return batch_id, created


def publish_written(
    repo: Repository,
    batch_id: str,
    created: bool,
    chunk_size: int,
    max_chunks: int,
    pending: KeptPending | None = None,
) -> int:
    """Phase 3, publish: the batch's chunks, after its commit, so a worker never receives ids it
    cannot read yet; returns jobs published. A crash here leaves the batch unpublished; the
    sweeper publishes it after its grace period."""
    batch = repo.get_batch(batch_id)
    try:
        if not created:
            # The same submission again: render nothing new, but publish whatever the first one
            # committed and could not publish (a retry after "broker unreachable" heals the batch).
            return publish_batch(repo, batch, chunk_size) if batch.published_at is None else 0
        size = chunk_size_for(batch.total, chunk_size, max_chunks)
        if pending is None or pending.runs is None:
            return publish_batch(repo, batch, size)  # read back page by page
        return publish_batch(repo, batch, size, chunks=pending.chunks(size))
    except BrokerError as exc:
        raise BrokerError(
            f"batch {batch_id} is saved, but its messages could not be published ({exc}); "
            f"the sweeper publishes them, or run `lcmq resume {batch_id}`"
        ) from exc


def create_and_enqueue(
    specs: Iterable[JobSpec],
    profile: Profile,
    options: BatchOptions,
    repo: Repository,
    storage: Storage,
    chunk_size: int,
    idempotency_key: str | None = None,
    priority: int = 0,
    max_chunks: int = 1000,
    owner: str | None = None,
    webhook_url: str | None = None,
) -> tuple[str, bool]:
    """Write a validated batch and publish its chunks; returns (batch id, created).

    `specs` may be a stream (a 10^6-row file is never held whole). When the idempotency key
    names an existing batch, nothing is written or published and that batch's id is returned.
    """
    staged = stage_batch(specs, profile, options, storage, idempotency_key, priority, owner, webhook_url)
    batch_id, created = write_batch(repo, staged)
    published = publish_written(repo, batch_id, created, chunk_size, max_chunks, staged.pending)
    if created:
        log.info("batch enqueued", extra={"batch_id": batch_id, "jobs": published, "profile": profile.name})
    else:
        log.info("identical batch exists", extra={"batch_id": batch_id, "published": published})
    return batch_id, created
