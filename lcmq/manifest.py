"""A batch's manifest: one record per succeeded image, in row order.

The same records reach the user three ways: `lcmq manifest` / `lcmq.manifest()`, the
`<batch>/manifest.jsonl` object next to the images, and the exports. They are built here, in
the contract, because both sides write the file: the worker that records a batch's last job,
and the sweeper for a batch whose worker died before it could (neither imports the other).

When the file is written: once the batch has no queued or running job, and again whenever
its final rows change (a retry requeues jobs: manifest_at goes back to NULL, see
Repository.requeue). batches.manifest_at holds the latest job finish the stored file covers.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lcmq import keys
from lcmq.errors import ProfileError
from lcmq.formats import OutputFormat
from lcmq.models import JobState
from lcmq.profiles import get_profile
from lcmq.repository import Repository
from lcmq.storage import Storage

log = logging.getLogger("lcmq.manifest")

CONTENT_TYPE = "application/x-ndjson"
# Rewrites when the batch keeps changing under the writer, before leaving it to the sweeper.
WRITE_ATTEMPTS = 3


def model_identity(profile_name: str) -> dict[str, Any]:
    """The model behind a profile, as this process's profiles define it (keep lcmq.toml the same
    on every machine); None values when the profile is no longer defined here."""
    try:
        profile = get_profile(profile_name)
    except ProfileError:
        # The fields every identity has (those hashed only when set, e.g. vae_decoder, are not).
        return dict.fromkeys(f.name for f in keys.MODEL_IDENTITY_V1 if f.absent is None)
    return keys.model_identity(profile)


def records(repo: Repository, storage: Storage, batch_id: str) -> Iterator[dict[str, Any]]:
    """The manifest records of a batch, streamed in row order (a page of rows at a time)."""
    batch = repo.get_batch(batch_id)
    output = OutputFormat.of(batch.options)
    model = model_identity(batch.profile)
    for job in repo.iter_jobs(batch_id, JobState.succeeded):
        assert job.key is not None  # a succeeded job's image is stored under its key
        record = {
            "index": job.index,
            "key": job.key,
            "url": storage.url(job.key),
            "sha256": job.sha256,
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": job.seed,
            "steps": job.steps,
            "guidance": job.guidance,
            "width": job.width,
            "height": job.height,
            "profile": batch.profile,
            "model": model,
            "format": output.name,
            "quality": output.quality,
            "worker": job.worker,
            "render_ms": job.render_ms,
            "batch_size": job.batch_size,
            "warning": job.warning,
            "attempts": job.attempts,
            "job_id": job.id,
            "metadata": job.meta,
        }
        # Only where used, so the records of plain text2img batches stay byte for byte the same.
        if job.loras:
            record["loras"] = job.loras
        if job.init_image is not None:
            record |= {"init_image": job.init_image, "strength": job.strength}
        if job.control:
            record["control"] = job.control
        yield record


def line(record: dict[str, Any]) -> str:
    """A record as one line of manifest.jsonl, and as `lcmq manifest` prints it: byte-equal."""
    return json.dumps(record, default=str)


def write_manifest(repo: Repository, storage: Storage, batch_id: str) -> bool:
    """Write `<batch>/manifest.jsonl` if the batch is finished; True when written and recorded.

    The file is built in a local temporary file (a 10^6-image batch is never held in memory)
    and stored in one put: readers see the previous manifest or the new one, whole. Then
    manifest_at is set, only if no job changed meanwhile; if one did, write again.
    """
    key = storage.manifest_key(batch_id)
    for _ in range(WRITE_ATTEMPTS):
        version = repo.manifest_version(batch_id)
        if version is None:  # jobs still queued or running: whoever finishes the last one writes it
            return False
        if repo.get_batch(batch_id).manifest_at == version:
            # Stored already: a later message of a finished (or canceled) batch asks again, and
            # rewriting a 10^6-line manifest per message would hold up that worker's records.
            return False
        count = 0
        with tempfile.TemporaryDirectory(prefix="lcmq-manifest-") as folder:
            path = Path(folder) / "manifest.jsonl"
            with path.open("w", encoding="utf-8") as fh:
                for record in records(repo, storage, batch_id):
                    fh.write(line(record) + "\n")
                    count += 1
            storage.put_file(key, path, CONTENT_TYPE)
        if repo.mark_manifest_written(batch_id, version):
            log.info("manifest written", extra={"batch_id": batch_id, "images": count, "key": key})
            return True
        log.info("batch changed while its manifest was written; writing it again", extra={"batch_id": batch_id})
    log.warning("manifest left due: the batch kept changing", extra={"batch_id": batch_id})
    return False
