"""The shapes of the /v1 API's requests and responses, for validation and /openapi.json.

The responses are what lcmq.api returns (the objects of `lcmq status --json`, `lcmq jobs --json`,
`lcmq schedule show`), typed here so the OpenAPI document says what a client gets.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lcmq.formats import DEFAULT_FORMAT

# --- requests ----------------------------------------------------------------------------


class BatchOptionsIn(BaseModel):
    """A batch's options, named as `lcmq submit`'s flags (checked by lcmq.api, as on the CLI)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model profile (see `lcmq models`)")
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = Field(None, description="batch seed; a row without its own seed derives one from it")
    name: str | None = None
    format: str = Field(DEFAULT_FORMAT, description="png, webp or jpeg")
    quality: int | None = Field(None, description="webp/jpeg quality, 1-100 (default 90)")
    priority: int = Field(0, description="0-9, 9 most urgent")
    chunk_size: int | None = Field(None, description="jobs per queue message")
    webhook_url: str | None = Field(None, description="called, signed, once every job of the batch is final")


class SubmitJson(BatchOptionsIn):
    """`POST /v1/batches` as JSON: the rows inline (a prompt string, or a JSONL-like object)."""

    rows: list[str | dict[str, Any]] = Field(description="prompts, or objects as a .jsonl file's lines")
    matrix: dict[str, list[Any]] | list[str] | None = Field(
        None, description='axes: {"seed": [0, 1], "style": ["oil", "ink"]} or ["seed=0..3", "steps=4,6"]'
    )
    loras: list[dict[str, Any]] | list[str] | None = Field(
        None, description='[{"name", "path", "weight"}] or ["NAME=PATH[:WEIGHT]"]: the style LoRAs of every row'
    )


class SubmitForm(BatchOptionsIn):
    """`POST /v1/batches` as multipart/form-data: the prompt file in `file` (.txt, .jsonl or
    .csv), the options as fields; `matrix` and `loras` repeated fields, each `NAME=VALUES` /
    `NAME=PATH[:WEIGHT]` or a JSON document."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    matrix: list[str] | None = None
    loras: list[str] | None = None


class ScheduleIn(BaseModel):
    """`POST /v1/schedules`: `lcmq schedule add`'s arguments."""

    model_config = ConfigDict(extra="forbid")

    name: str
    catalog: str = Field(description="a .csv/.jsonl path or s3:// URL, read afresh at each run")
    template: str = Field(description="the prompt, with {field} taken from each catalog item")
    cron: str = Field(description="five cron fields, wall-clock time in `tz`")
    model: str
    tz: str = "UTC"
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""
    seed: int | None = None
    format: str = DEFAULT_FORMAT
    quality: int | None = None


# --- responses ---------------------------------------------------------------------------


class BatchLinks(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    jobs: str
    manifest: str
    events: str
    cancel: str


class BatchStatusOut(BaseModel):
    """The status object of `lcmq status --json`."""

    batch_id: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    output: str
    items: dict[str, int] | None = Field(None, description="a schedule run's batch: its catalog items compared")
    resubmitted: bool = Field(False, description="present (true) when this submit found the batch made before")


class BatchOut(BatchStatusOut):
    links: BatchLinks


class BatchSummaryOut(BatchOut):
    """A batch as listed: its status object, name, profile and creation time."""

    name: str | None
    profile: str
    created_at: str


class BatchPage(BaseModel):
    data: list[BatchSummaryOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null on the last")


class JobOut(BaseModel):
    """A job as `lcmq jobs --json` shows it."""

    index: int
    job_id: str
    state: str
    attempts: int
    worker: str | None
    key: str | None
    url: str | None
    error: str | None
    warning: str | None
    prompt: str
    seed: int
    started_at: str | None
    finished_at: str | None
    render_ms: int | None


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class ScheduleOut(BaseModel):
    """A schedule as `lcmq schedule show` prints it."""

    name: str
    catalog: str
    template: str
    cron: str
    timezone: str
    model: str
    options: dict[str, Any]
    paused: bool
    next_run_at: str | None
    last_run_at: str | None
    last_batch_id: str | None
    items: dict[str, int] | None
    last_error: str | None
    catalog_items: dict[str, int]
    output: str
    last_batch: BatchStatusOut | None = None


class UnchangedRunOut(BaseModel):
    """A schedule run that found nothing new or changed: no batch was submitted."""

    schedule: str
    items: dict[str, int]
    batch_id: None
    submitted: int
    unchanged: bool


class ReadyOut(BaseModel):
    status: str = Field(description="ready, or unready (503) with the failing parts named in `failing`")
    checks: dict[str, str] = Field(description='database, broker, storage: "ok" or what went wrong')
    failing: list[str] = []


class ErrorOut(BaseModel):
    """An error: the CLI's message; for an input error also where (file or request part, line, field)."""

    error: str
    source: str | None = None
    line: int | None = None
    field: str | None = None
    message: str | None = None


class DetailOut(BaseModel):
    detail: str


Responses = dict[int | str, dict[str, Any]]

NOT_FOUND: Responses = {404: {"model": ErrorOut, "description": "no such batch, or another key's"}}
UNAUTHORIZED: Responses = {401: {"model": DetailOut, "description": "no valid API key (missing, unknown or revoked)"}}
INVALID: Responses = {422: {"model": ErrorOut, "description": "a bad parameter or row, named with its line and field"}}
