"""The /v1 JSON API, /healthz and /readyz.

Each route parses, authenticates (`Caller`), calls lcmq.api with the caller as `principal`, and
serialises; errors are lcmq's own, mapped to statuses by class in lcmq.http.app. Shapes are in
lcmq.http.schemas; the paging cursors are opaque to clients.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lcmq import api
from lcmq.access import Principal
from lcmq.errors import InputError
from lcmq.http import submission
from lcmq.http.auth import Caller, bearer
from lcmq.http.events import batch_events
from lcmq.http.ready import readiness
from lcmq.http.schemas import (
    INVALID,
    NOT_FOUND,
    UNAUTHORIZED,
    BatchOut,
    BatchPage,
    ErrorOut,
    JobPage,
    ReadyOut,
    Responses,
    ScheduleIn,
    ScheduleOut,
    SubmitForm,
    SubmitJson,
    UnchangedRunOut,
)
from lcmq.manifest import line
from lcmq.models import JobState

router = APIRouter()

v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], responses=UNAUTHORIZED | INVALID)

MAX_PAGE = 100
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"items per page, 1-{MAX_PAGE}")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is up (nothing else is checked: see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], response_model=ReadyOut, responses={503: {"model": ReadyOut}})
def readyz(request: Request) -> JSONResponse:
    """The database, the broker and the storage each answer; 503 names the failing part(s)."""
    checks = readiness(request.app.state.repo, request.app.state.settings)
    failing = [name for name, result in checks.items() if result != "ok"]
    body = ReadyOut(status="unready" if failing else "ready", checks=checks, failing=failing)
    return JSONResponse(body.model_dump(), status_code=503 if failing else 200)


# --- batches -----------------------------------------------------------------------------


def streamed(media_type: str) -> Responses:
    return {200: {"content": {media_type: {"schema": {"type": "string"}}}}}


def links(batch_id: str) -> dict[str, str]:
    base = f"/v1/batches/{batch_id}"
    return {
        "self": base,
        "jobs": f"{base}/jobs",
        "manifest": f"{base}/manifest",
        "events": f"{base}/events",
        "cancel": f"{base}/cancel",
    }


def with_links(status: dict[str, Any]) -> dict[str, Any]:
    return status | {"links": links(status["batch_id"])}


def batch_out(status: api.BatchStatus) -> dict[str, Any]:
    return with_links(status.to_dict())


SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SubmitJson.model_json_schema()},
            "multipart/form-data": {"schema": SubmitForm.model_json_schema()},
        },
    }
}


@v1.post(
    "/batches",
    tags=["batches"],
    status_code=201,
    response_model=BatchOut,
    response_model_exclude_unset=True,
    responses={
        200: {"model": BatchOut, "description": "submitted before: the first batch"},
        400: {"description": "a multipart body that does not parse"},
        413: {"model": ErrorOut, "description": "a body over LCMQ_API_MAX_BODY_MB"},
    },
    openapi_extra=SUBMIT_BODY,
)
async def submit(
    request: Request,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(description="a repeat returns the first batch")] = None,
) -> JSONResponse:
    """Validate every row and enqueue the batch: JSON (`rows` inline) or multipart (the prompt
    file in `file`). Same parser and checks as `lcmq submit`; nothing is written on error."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        status = await submit_form(request, caller, idempotency_key)
    else:
        status = await run_in_threadpool(submit_json, await json_body(request), caller, idempotency_key)
    return JSONResponse(batch_out(status), status_code=200 if status.resubmitted else 201)


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError("request", None, "body", f"not a JSON document or a multipart form: {exc}") from None


def submit_json(data: Any, caller: Principal, idempotency_key: str | None) -> api.BatchStatus:
    rows, arguments = submission.from_json(data)
    return api.submit(rows, **arguments, idempotency_key=idempotency_key, principal=caller)


async def submit_form(request: Request, caller: Principal, idempotency_key: str | None) -> api.BatchStatus:
    async with request.form(max_files=1, max_fields=1000) as form:
        upload = submission.upload_of(form)
        name = submission.upload_name(upload)
        arguments = submission.form_arguments(form, name)
        with submission.saved_upload(upload, name) as path:
            try:
                return await run_in_threadpool(
                    api.submit, path, **arguments, idempotency_key=idempotency_key, principal=caller
                )
            except InputError as exc:
                raise submission.reported_against(exc, path, name) from None


def encode_cursor(summary: dict[str, Any]) -> str:
    raw = f"{summary['created_at']}|{summary['batch_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, batch_id = raw.partition("|")
        if not batch_id:
            raise ValueError("no batch id")
        return datetime.fromisoformat(created_at), batch_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InputError("query", None, "cursor", "not a cursor this API gave (use next_cursor as it is)") from None


@v1.get("/batches", tags=["batches"], response_model=BatchPage, response_model_exclude_unset=True)
def list_batches(caller: Caller, cursor: Cursor = None, limit: Limit = 20) -> dict[str, Any]:
    """The batches this key sees (an admin key: all), newest first."""
    before = None if cursor is None else decode_cursor(cursor)
    found = api.batches(limit + 1, caller, before=before)
    page = found[:limit]
    more = len(found) > limit
    return {"data": [with_links(s) for s in page], "next_cursor": encode_cursor(page[-1]) if more else None}


@v1.get(
    "/batches/{batch_id}",
    tags=["batches"],
    response_model=BatchOut,
    response_model_exclude_unset=True,
    responses=NOT_FOUND,
)
def get_batch(batch_id: str, caller: Caller) -> dict[str, Any]:
    return batch_out(api.status(batch_id, caller))


def job_cursor(cursor: str | None) -> int:
    if cursor is None:
        return -1
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 12:
        raise InputError("query", None, "cursor", "not a cursor this API gave (use next_cursor as it is)")
    return int(cursor)


@v1.get("/batches/{batch_id}/jobs", tags=["batches"], response_model=JobPage, responses=NOT_FOUND)
def list_jobs(
    batch_id: str,
    caller: Caller,
    state: Annotated[JobState | None, Query(description="only the jobs in this state")] = None,
    cursor: Cursor = None,
    limit: Limit = MAX_PAGE,
) -> dict[str, Any]:
    """The batch's jobs in row order: state, attempts, worker, image URL or failure reason."""
    found = api.jobs_page(batch_id, state, after_index=job_cursor(cursor), limit=limit + 1, principal=caller)
    page = found[:limit]
    return {"data": page, "next_cursor": str(page[-1]["index"]) if len(found) > limit else None}


@v1.get(
    "/batches/{batch_id}/manifest",
    tags=["batches"],
    response_class=StreamingResponse,
    responses=NOT_FOUND | streamed("application/x-ndjson"),
)
def manifest(batch_id: str, caller: Caller) -> StreamingResponse:
    """One JSON line per succeeded image, in row order (the batch's manifest.jsonl), streamed."""
    records = api.manifest(batch_id, caller)  # checks the batch first: 404 before any byte
    return StreamingResponse((line(record) + "\n" for record in records), media_type="application/x-ndjson")


@v1.get(
    "/batches/{batch_id}/events",
    tags=["batches"],
    response_class=StreamingResponse,
    responses=NOT_FOUND | streamed("text/event-stream"),
)
async def events(
    request: Request,
    batch_id: str,
    caller: Caller,
    last_event_id: Annotated[str | None, Header(description="resume after this event")] = None,
) -> StreamingResponse:
    """Server-sent events: `status` (the status object) when the counts change, then `done`."""
    await run_in_threadpool(api.status, batch_id, caller)  # 404 before the stream starts
    interval = request.app.state.settings.api_events_min_interval_s
    return StreamingResponse(
        batch_events(batch_id, caller, last_event_id, interval),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _action(path: str, doc: str, call):
    def act(batch_id: str, caller: Caller) -> dict[str, Any]:
        return batch_out(call(batch_id, caller))

    act.__doc__ = doc
    act.__name__ = f"{path}_batch"
    v1.post(
        f"/batches/{{batch_id}}/{path}",
        tags=["batches"],
        response_model=BatchOut,
        response_model_exclude_unset=True,
        responses=NOT_FOUND,
    )(act)


_action("cancel", "Queued jobs never start; running ones stop at their worker's next micro-batch.", api.cancel)
_action("resume", "Re-enqueue the jobs not yet final, and canceled ones.", api.resume)
_action("retry", "Give the failed jobs a fresh set of attempts.", api.retry_failed)


# --- schedules ---------------------------------------------------------------------------


@v1.get("/schedules", tags=["schedules"], response_model=list[ScheduleOut])
def list_schedules(caller: Caller) -> list[dict[str, Any]]:
    return api.schedules(caller)


@v1.post("/schedules", tags=["schedules"], status_code=201, response_model=ScheduleOut)
def add_schedule(body: ScheduleIn, caller: Caller) -> dict[str, Any]:
    """Check everything (the catalog is read now), then store the schedule."""
    return api.schedule_add(
        body.name,
        catalog=body.catalog,
        template=body.template,
        cron=body.cron,
        model=body.model,
        steps=body.steps,
        guidance=body.guidance,
        width=body.width,
        height=body.height,
        negative_prompt=body.negative_prompt,
        seed=body.seed,
        image_format=body.format,
        quality=body.quality,
        timezone=body.tz,
        principal=caller,
    )


@v1.get("/schedules/{name}", tags=["schedules"], response_model=ScheduleOut, responses=NOT_FOUND)
def get_schedule(name: str, caller: Caller) -> dict[str, Any]:
    return api.schedule_show(name, caller)


@v1.post(
    "/schedules/{name}/run",
    tags=["schedules"],
    response_model=BatchOut | UnchangedRunOut,
    response_model_exclude_unset=True,
    responses=NOT_FOUND,
)
def run_schedule(name: str, caller: Caller) -> dict[str, Any]:
    """Run now, once: a batch of the catalog's new and changed items, or `unchanged`."""
    result = api.schedule_run(name, caller)
    return result.to_dict() if isinstance(result, api.UnchangedRun) else batch_out(result)


router.include_router(v1)
