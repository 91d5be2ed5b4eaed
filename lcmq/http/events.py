"""`GET /v1/batches/{id}/events`: a batch's counts as server-sent events.

Each `status` event carries the status object (as `GET /v1/batches/{id}`) and has as its id the
counts it shows (`<succeeded>.<failed>.<canceled>.<running>.<queued>`). One is sent when the
counts differ from the last one sent, at most one per LCMQ_API_EVENTS_MIN_INTERVAL_S; when every
job is final, one `done` event (the final status object) ends the stream. A client that
reconnects with `Last-Event-ID` is sent nothing until the counts differ from that id's (the
browser's EventSource sends it by itself), then, as before, the changes and `done`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from lcmq import api
from lcmq.access import Principal

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


def event_id(status: api.BatchStatus) -> str:
    return f"{status.succeeded}.{status.failed}.{status.canceled}.{status.running}.{status.queued}"


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


async def batch_events(
    batch_id: str, principal: Principal, last_event_id: str | None, min_interval_s: float
) -> AsyncIterator[str]:
    """The stream; the caller has already checked that `principal` sees the batch."""
    last_sent, quiet_for = last_event_id, 0.0
    yield f"retry: {int(max(min_interval_s, 1.0) * 1000)}\n\n"
    while True:
        status = await run_in_threadpool(api.status, batch_id, principal)
        current = event_id(status)
        if status.done:
            yield sse("done", status.to_dict(), current)
            return
        if current != last_sent:
            yield sse("status", status.to_dict(), current)
            last_sent, quiet_for = current, 0.0
        elif quiet_for >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            quiet_for = 0.0
        await asyncio.sleep(min_interval_s)
        quiet_for += min_interval_s
