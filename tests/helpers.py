"""Small builders shared by tests (pytest puts tests/ on sys.path through its conftest)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from lcmq.repository import JobRecord


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
