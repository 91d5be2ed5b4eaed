"""Small builders shared by tests (pytest puts tests/ on sys.path through its conftest)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from lcmq.repository import JobRecord, Repository


def job_record(index: int = 0, **changes) -> JobRecord:
    """A claimed job as the repository returns it, for rendering without a database."""
    job = JobRecord(
        id=f"job{index}",
        batch_id="b1",
        index=index,
        state="running",
        prompt="a lighthouse at dusk",
        negative_prompt="",
        seed=index,
        steps=4,
        guidance=1.0,
        width=64,
        height=64,
        meta={},
        attempts=1,
        worker="w",
        error=None,
        key=None,
        sha256=None,
        render_ms=None,
        batch_size=None,
        warning=None,
        dispatched_at=None,
        created_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
    )
    return replace(job, **changes)


def create_test_batch(
    repo: Repository,
    n: int,
    *,
    profile: str = "tiny",
    output: str = "file:///x/",
    options: dict[str, Any] | None = None,
    ids_from_batch: bool = False,
    batch_id: str | None = None,
) -> tuple[str, list[str]]:
    """A batch of `n` queued 64x64 jobs written through the repository, as a submit writes them;
    (batch id, job ids). `ids_from_batch`: job ids derived from the batch id, as submit makes them."""
    batch_id = batch_id or uuid.uuid4().hex[:16]
    job_ids = [f"{batch_id}{i:016x}" if ids_from_batch else uuid.uuid4().hex for i in range(n)]
    batch = {
        "id": batch_id,
        "name": None,
        "profile": profile,
        "total": n,
        "seed": 1,
        "output": output,
        "options": options or {},
    }
    rows = [
        {
            "id": job_id,
            "index": i,
            "prompt": f"p{i}",
            "negative_prompt": "",
            "seed": i,
            "steps": 4,
            "guidance": 1.0,
            "width": 64,
            "height": 64,
            "meta": {"i": i},
        }
        for i, job_id in enumerate(job_ids)
    ]
    repo.create_batch(batch, rows)
    return batch_id, job_ids
