"""The Python API: what scripts import and what the CLI calls. One door to the system.

import lcmq
batch = lcmq.submit(["a red fox", {"prompt": "a blue owl", "seed": 7}], model="tiny")
lcmq.wait(batch.batch_id)
for line in lcmq.manifest(batch.batch_id): ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lcmq import keys
from lcmq.access import LOCAL, Principal
from lcmq.costs import batch_costs, worker_costs
from lcmq.errors import InputError, NotFoundError, ProfileError
from lcmq.formats import DEFAULT_FORMAT, check_output
from lcmq.matrix import check_matrix
from lcmq.matrix import expand as expand_matrix
from lcmq.migrate import ensure_embedded_schema
from lcmq.models import JobState
from lcmq.profiles import Profile, get_profile, load_profiles
from lcmq.queue import MAX_PRIORITY
from lcmq.repository import ANY_OWNER, BatchRecord, JobRecord, Repository, ScheduleRecord, WorkerRecord, utcnow
from lcmq.settings import Settings, get_settings
from lcmq.spec import BatchOptions, JobSpec, RowValidator, open_batch_file, rows_from_objects, validate_rows
from lcmq.storage import Storage, storage_from_settings

# BatchStatus fields that `to_dict` leaves out while they hold these defaults.
SHOWN_WHEN_SET: dict[str, Any] = {"items": None, "resubmitted": False}


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    output: str
    # A schedule run's batch: how its catalog's items compared with the run before.
    items: dict[str, int] | None = None
    # submit found this batch already submitted (same content and parameters): nothing new was
    # written, and a canceled batch stays canceled until `resume`.
    resubmitted: bool = False

    @property
    def done(self) -> bool:
        return self.queued == 0 and self.running == 0

    @property
    def ok(self) -> bool:
        return self.succeeded == self.total

    def to_dict(self) -> dict[str, Any]:
        """The status object of `--json`; a field of SHOWN_WHEN_SET only when it holds more than
        its default, so a plain batch prints exactly what it always did."""
        return {
            name: value
            for name, value in asdict(self).items()
            if name not in SHOWN_WHEN_SET or value != SHOWN_WHEN_SET[name]
        }


@dataclass(frozen=True)
class UnchangedRun:
    """A schedule run that found nothing new or changed in its catalog: no batch was submitted
    (nothing to render or upload), yet the run counted (its counts and next fire time moved)."""

    schedule: str
    items: dict[str, int]  # new=0 changed=0; unchanged and removed as counted
    batch_id: None = None
    submitted: int = 0
    unchanged: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repository(settings: Settings | None = None) -> Repository:
    settings = settings or get_settings()
    url = settings.database_url_resolved
    ensure_embedded_schema(url)  # SQLite migrates itself on first use; Postgres on `lcmq db upgrade`
    return Repository(url)


def storage(settings: Settings | None = None) -> Storage:
    return storage_from_settings(settings or get_settings())


def _resolve_profile(model: str, source: str) -> Profile:
    try:
        return get_profile(model)
    except ProfileError as exc:
        raise InputError(source, None, "model", str(exc)) from None


def _idempotency_key(content_sha256: str, options: BatchOptions, profile: Profile, chunk_size: int) -> str:
    """The same content, profile and parameters give the same key: a resubmission is found."""
    return keys.idempotency_key(content_sha256, options, profile, chunk_size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_flags(source: str, chunk_size: Any, priority: Any, idempotency_key: Any) -> None:
    if not _is_int(chunk_size) or not 1 <= chunk_size <= 10_000:
        raise InputError(source, None, "--chunk-size", f"must be between 1 and 10000 (got {chunk_size})")
    if not _is_int(priority) or not 0 <= priority <= MAX_PRIORITY:
        raise InputError(source, None, "--priority", f"must be between 0 and {MAX_PRIORITY} (got {priority})")
    if idempotency_key is not None and not (
        isinstance(idempotency_key, str) and 1 <= len(idempotency_key) <= 64 and idempotency_key.isprintable()
    ):
        raise InputError(source, None, "--idempotency-key", "must be 1-64 printable characters")


def _control_entries(controls: Any, source: str) -> list[Any]:
    """`controls` as given in Python: a list of mappings, checked by the row validator."""
    if isinstance(controls, (str, bytes, Mapping)) or not isinstance(controls, Iterable):
        raise InputError(
            source, None, "--control", f"must be a list of {{name, image, ...}} (got {type(controls).__name__})"
        )
    return [dict(entry) if isinstance(entry, Mapping) else entry for entry in controls]


def _lora_entries(loras: Any, source: str) -> list[dict[str, Any]]:
    """The batch's LoRA list as plain dicts (checked by the validator, as `--lora`)."""
    if isinstance(loras, (str, bytes, Mapping)) or not isinstance(loras, Iterable):
        raise InputError(
            source, None, "--lora", f"must be a list of {{name, path, weight}} (got {type(loras).__name__})"
        )
    return [dict(entry) if isinstance(entry, Mapping) else entry for entry in loras]


def submit(
    rows: Iterable[str | Mapping[str, Any]] | str | Path,
    *,
    model: str,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    name: str | None = None,
    chunk_size: int | None = None,
    priority: int = 0,
    idempotency_key: str | None = None,
    image_format: str = DEFAULT_FORMAT,
    quality: int | None = None,
    matrix: Mapping[str, Sequence[Any]] | Sequence[tuple[str, Sequence[Any]]] | None = None,
    loras: Sequence[Mapping[str, Any]] | None = None,
    controls: Sequence[Mapping[str, Any]] | None = None,
    webhook_url: str | None = None,
    principal: Principal = LOCAL,
) -> BatchStatus:
    """Validate every row, then write the batch and enqueue it. Returns its first status.

    `rows` is a path to a .txt/.jsonl/.csv file, or prompts (strings) and JSONL-like mappings.
    Nothing is written or enqueued unless every row is valid. Submitting the same content with
    the same parameters again (even concurrently) returns the existing batch and renders
    nothing new; `idempotency_key` replaces the key computed from them. `image_format` is png,
    webp or jpeg; `quality` (1-100, default 90) applies to webp and jpeg. `matrix` multiplies
    every row by axes (`{"seed": [0, 1], "steps": [4, 6], "style": ["oil", "ink"]}`: job fields,
    or text that fills `{style}` in the prompt); identical cells of a row collapse (lcmq.matrix).
    `loras` (`[{"name": "ink", "path": "ink.safetensors", "weight": 0.8}]`) are the style LoRAs of
    every row that lists none of its own (a row's `loras` replaces them; lcmq.loras). Rows may
    also give `init_image` and `strength` (img2img) and `control` (ControlNets, T2I-Adapters:
    lcmq.controls); `controls` is the control set of every row without its own (`--control`).
    Relative file names in a batch file are resolved against its folder. `webhook_url` is called,
    signed, once every job is final (lcmq.webhooks). `principal` is who submits: the batch belongs to it (lcmq.access).
    """
    from lcmq.webhooks import check_webhook_url
    from scheduler.batches import create_and_enqueue  # the producer side; the API is its door

    settings = get_settings()
    chunk_size = settings.chunk_size if chunk_size is None else chunk_size
    path = Path(rows) if isinstance(rows, (str, Path)) else None
    source = str(path) if path else "<rows>"
    if path is None and (not isinstance(rows, Iterable) or isinstance(rows, (bytes, Mapping))):
        raise InputError(
            source,
            None,
            None,
            f"rows must be a file path or an iterable of prompts and mappings (got {type(rows).__name__})",
        )
    _check_flags(source, chunk_size, priority, idempotency_key)
    if webhook_url is not None:
        check_webhook_url(webhook_url, source, settings)
        if principal.owner is None:  # a webhook is signed with its batch's key's secret
            raise InputError(source, None, "webhook_url", "needs a batch submitted with an API key (lcmq api)")
    image_format, quality = check_output(source, image_format, quality)
    axes = check_matrix(matrix, source)
    options = BatchOptions(
        model=model,
        steps=steps,
        guidance=guidance,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        seed=seed,
        name=name,
        image_format=image_format,
        quality=quality,
        matrix=axes,
        loras=None if loras is None else tuple(_lora_entries(loras, source)),
        controls=None if controls is None else tuple(_control_entries(controls, source)),
    )
    profile = _resolve_profile(model, source)
    validator = RowValidator(
        options, profile, source, base_dir=path.parent if path else None, local_files=principal.local_files
    )
    specs: Iterable[JobSpec]
    if path is not None:
        # Validated while written, in one transaction: a bad row anywhere commits nothing.
        specs, content_sha256 = open_batch_file(path, validator)
    else:
        assert not isinstance(rows, (str, Path))  # a path was handled above
        specs = validate_rows(rows_from_objects(rows), validator)
        content_sha256 = keys.content_sha256(specs)
    specs = expand_matrix(specs, axes, source)
    key = keys.owned_idempotency_key(
        principal.owner, idempotency_key or _idempotency_key(content_sha256, options, profile, chunk_size)
    )
    batch_id, created = create_and_enqueue(
        specs,
        profile,
        options,
        repository(settings),
        storage(settings),
        chunk_size,
        idempotency_key=key,
        priority=priority,
        max_chunks=settings.max_chunks_per_batch,
        owner=principal.owner,
        webhook_url=webhook_url,
    )
    return replace(status(batch_id), resubmitted=not created)


def visible_batch(repo: Repository, batch_id: str, principal: Principal = LOCAL) -> BatchRecord:
    """The batch, if `principal` may see it; another key's batch is not found, as an unknown id."""
    batch = repo.get_batch(batch_id)
    if not principal.sees(batch.owner):
        raise NotFoundError(f"no batch {batch_id!r}")
    return batch


def cancel(batch_id: str, principal: Principal = LOCAL) -> BatchStatus:
    """Queued jobs never start; running ones stop at their worker's next micro-batch."""
    repo = repository()
    visible_batch(repo, batch_id, principal)
    repo.cancel_batch(batch_id)
    return status(batch_id)


def _requeue_and_dispatch(
    batch_id: str, states: list[JobState], reset_attempts: bool, principal: Principal
) -> BatchStatus:
    from scheduler.dispatch import dispatch_batch

    settings = get_settings()
    repo = repository(settings)
    batch = visible_batch(repo, batch_id, principal)
    repo.requeue(batch_id, states, reset_attempts=reset_attempts)
    dispatch_batch(repo, batch, settings.chunk_size)
    return status(batch_id)


def resume(batch_id: str, principal: Principal = LOCAL) -> BatchStatus:
    """Re-enqueue the jobs not yet final (queued, or running under an expired lease) and canceled ones."""
    return _requeue_and_dispatch(batch_id, [JobState.queued, JobState.running, JobState.canceled], False, principal)


def retry_failed(batch_id: str, principal: Principal = LOCAL) -> BatchStatus:
    """Give the failed jobs of a batch a fresh set of attempts."""
    return _requeue_and_dispatch(batch_id, [JobState.failed], True, principal)


def sweep() -> dict[str, int]:
    """One pass of the sweeper (see scheduler.sweeper)."""
    from scheduler.sweeper import sweep_once

    settings = get_settings()
    return sweep_once(repository(settings), settings).to_dict()


def _status_of(batch: BatchRecord, counts: dict[str, int]) -> BatchStatus:
    return BatchStatus(
        batch_id=batch.id,
        total=batch.total,
        output=batch.output,
        items=batch.options.get("items"),
        queued=counts.get(JobState.queued.value, 0),
        running=counts.get(JobState.running.value, 0),
        succeeded=counts.get(JobState.succeeded.value, 0),
        failed=counts.get(JobState.failed.value, 0),
        canceled=counts.get(JobState.canceled.value, 0),
    )


def status(batch_id: str, principal: Principal = LOCAL) -> BatchStatus:
    repo = repository()
    return _status_of(visible_batch(repo, batch_id, principal), repo.state_counts(batch_id))


NO_WORKER_AFTER_S = 3.0  # jobs queued, none running, this long: wait looks for a live worker


def wait(
    batch_id: str,
    on_progress: Callable[[BatchStatus], None] | None = None,
    timeout_s: float | None = None,
    on_no_worker: Callable[[str], None] | None = None,
    no_worker_after_s: float = NO_WORKER_AFTER_S,
) -> BatchStatus:
    """Poll until every job of the batch is final (or the timeout passes); returns the last status.

    `on_no_worker(profile)` is told when jobs have been queued, none running, for
    `no_worker_after_s` and no live worker serves the batch's profile (looked up in the
    background: polling goes on meanwhile). The wait goes on; a worker started later is used.
    """
    from lcmq.workers import NoWorkerWatch

    settings = get_settings()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    watch = None
    if on_no_worker is not None:
        profile = repository(settings).get_batch(batch_id).profile
        watch = NoWorkerWatch(settings, profile, on_no_worker, no_worker_after_s)
    while True:
        current = status(batch_id)
        if on_progress:
            on_progress(current)
        if current.done or (deadline is not None and time.monotonic() > deadline):
            return current
        if watch is not None:
            watch.observe(current.queued, current.running)
        time.sleep(settings.poll_s)


def batch_summary(batch: BatchRecord, counts: dict[str, int]) -> dict[str, Any]:
    """A batch as listed: its status object, name, profile and creation time."""
    return _status_of(batch, counts).to_dict() | {
        "name": batch.name,
        "profile": batch.profile,
        "created_at": batch.created_at.isoformat(),
    }


def batches(
    limit: int = 20, principal: Principal = LOCAL, before: tuple[datetime, str] | None = None
) -> list[dict[str, Any]]:
    """The newest batches `principal` sees (an admin: all), newest first; `before` is the
    (created_at, batch_id) of the last one of the previous page."""
    owner = ANY_OWNER if principal.admin else principal.owner
    return [batch_summary(b, counts) for b, counts in repository().recent_batches(limit, owner=owner, before=before)]


def manifest(batch_id: str, principal: Principal = LOCAL) -> Iterator[dict[str, Any]]:
    """One record per succeeded image, in row order: the records of `<batch>/manifest.jsonl`."""
    from lcmq.manifest import records

    repo = repository()
    visible_batch(repo, batch_id, principal)
    return records(repo, storage(), batch_id)


def export(batch_id: str, *, format: str, to: str | Path, shard_size: int = 1000) -> dict[str, Any]:
    """Export a finished batch's images as a dataset: format "imagefolder" (images plus a
    metadata.jsonl that `datasets.load_dataset("imagefolder", data_dir=to)` reads) or
    "webdataset" (tar shards of at most `shard_size` samples). `to` is a folder or an
    s3://bucket/prefix, and must be empty. Returns the summary, also written as export.json."""
    from lcmq.export import export as run_export

    settings = get_settings()
    return run_export(repository(settings), storage(settings), batch_id, format, to, settings, shard_size)


def jobs(batch_id: str, state: JobState | str | None = None, principal: Principal = LOCAL) -> Iterator[dict[str, Any]]:
    """What happened to each job of a batch, in row order (all, or those in one state): its
    state, attempts, the worker that last held it, and its image or the reason it failed."""
    repo = repository()
    visible_batch(repo, batch_id, principal)  # an unknown batch is an error, not an empty list
    wanted = JobState(state) if isinstance(state, str) else state
    store = storage()
    for job in repo.iter_jobs(batch_id, wanted):
        yield job_dict(job, store)


def jobs_page(
    batch_id: str,
    state: JobState | str | None = None,
    *,
    after_index: int = -1,
    limit: int = 100,
    principal: Principal = LOCAL,
) -> list[dict[str, Any]]:
    """Up to `limit` jobs after row `after_index`, in row order (the HTTP API's pages)."""
    repo = repository()
    visible_batch(repo, batch_id, principal)
    wanted = JobState(state) if isinstance(state, str) else state
    store = storage()
    return [job_dict(job, store) for job in repo.jobs_page(batch_id, wanted, after_index, limit)]


def job_dict(job: JobRecord, store: Storage) -> dict[str, Any]:
    """What `lcmq jobs --json` shows of a job."""
    return {
        "index": job.index,
        "job_id": job.id,
        "state": job.state,
        "attempts": job.attempts,
        "worker": job.worker,
        "key": job.key,
        "url": store.url(job.key) if job.key else None,
        "error": job.error,
        "warning": job.warning,
        "prompt": job.prompt,
        "seed": job.seed,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "render_ms": job.render_ms,
    }


def push_model(name: str, source: Path, to: str | None = None) -> dict[str, Any]:
    """Upload a local model (a diffusers folder or one file) and its sha256 manifest to S3
    (lcmq/modelpack.py); the URL to name in a profile, and what was pushed."""
    from lcmq.modelpack import push_model as push

    pushed = push(name, source, to, get_settings())
    return {
        "url": pushed.url,
        "name": pushed.manifest.name,
        "kind": pushed.manifest.kind,
        "files": len(pushed.manifest.files),
        "bytes": pushed.manifest.total_bytes,
    }


def models() -> list[dict[str, Any]]:
    return [p.to_dict() | {"queue": p.queue} for p in load_profiles().values()]


# --- schedules: catalogs rendered on a cron schedule ------------------------------------------


def _iso(when) -> str | None:
    return None if when is None else when.isoformat()


def _schedule_dict(record: ScheduleRecord, repo: Repository) -> dict[str, Any]:
    return {
        "name": record.name,
        "catalog": record.catalog,
        "template": record.template,
        "cron": record.cron,
        "timezone": record.timezone,
        "model": record.profile,
        "options": record.options,
        "paused": record.paused,
        "next_run_at": _iso(record.next_run_at),
        "last_run_at": _iso(record.last_run_at),
        "last_batch_id": record.last_batch_id,
        "items": record.last_counts,
        "last_error": record.last_error,
        "catalog_items": repo.catalog_counts(record.name),
        "output": storage().catalog_url(record.name),
    }


def schedule_add(
    name: str,
    *,
    catalog: str,
    template: str,
    cron: str,
    model: str,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str = "",
    seed: int | None = None,
    image_format: str = DEFAULT_FORMAT,
    quality: int | None = None,
    timezone: str = "UTC",
    principal: Principal = LOCAL,
) -> dict[str, Any]:
    """Check everything (the catalog is read and every item checked now, and again at each run),
    then store the schedule; it first fires at the next cron time. Nothing is written on error.
    The cron fields are wall-clock times in `timezone` (an IANA name); next_run_at is in UTC."""
    from lcmq.models import SCHEDULE_NAME_LENGTH
    from scheduler.catalog import check_item_id, load_items, normalize_location
    from scheduler.cron import parse_cron

    source = f"schedule {name}"

    def fail(message: str):
        raise InputError("schedule", None, "name", message)

    check_item_id(name, fail)  # it names the folder of the catalog's images: the same rules as ids
    if len(name) > SCHEDULE_NAME_LENGTH:
        fail(f"must be at most {SCHEDULE_NAME_LENGTH} characters (got {len(name)})")
    schedule_cron = parse_cron(cron, timezone, source)  # an InputError naming --cron or --tz
    next_run_at = schedule_cron.next_after(utcnow())
    location = normalize_location(catalog)
    profile = _resolve_profile(model, source)
    options: dict[str, Any] = {
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "negative_prompt": negative_prompt,
        "seed": seed,
    }
    image_format, quality = check_output(source, image_format, quality)
    if image_format != DEFAULT_FORMAT:  # PNG schedules store what they stored before formats
        options |= {"image_format": image_format, "quality": quality}
    settings = get_settings()
    if not principal.local_files and not location.startswith("s3://"):
        raise InputError(source, None, "catalog", "over the HTTP API a catalog must be an s3:// URL")
    load_items(
        location,
        template,
        BatchOptions(model=model, name=name, **options),
        profile,
        settings,
        local_files=principal.local_files,
    )
    repo = repository(settings)
    if not repo.add_schedule(
        {
            "name": name,
            "catalog": location,
            "template": template,
            "cron": cron.strip(),
            "timezone": schedule_cron.zone.key,
            "profile": profile.name,
            "options": options,
            "next_run_at": next_run_at,
            "owner": principal.owner,
        }
    ):
        raise InputError(source, None, "name", "a schedule of this name exists (`lcmq schedule rm` it first)")
    return schedule_show(name)


def visible_schedule(repo: Repository, name: str, principal: Principal = LOCAL) -> ScheduleRecord:
    """The schedule, if `principal` may see it; another key's schedule is not found."""
    record = repo.get_schedule(name)
    if not principal.sees(record.owner):
        raise NotFoundError(f"no schedule {name!r}")
    return record


def schedules(principal: Principal = LOCAL) -> list[dict[str, Any]]:
    repo = repository()
    return [_schedule_dict(record, repo) for record in repo.schedules() if principal.sees(record.owner)]


def schedule_show(name: str, principal: Principal = LOCAL) -> dict[str, Any]:
    """A schedule and its catalog's state: items in it and removed, the last run and its batch."""
    repo = repository()
    shown = _schedule_dict(visible_schedule(repo, name, principal), repo)
    shown["last_batch"] = status(shown["last_batch_id"]).to_dict() if shown["last_batch_id"] else None
    return shown


def schedule_pause(name: str) -> dict[str, Any]:
    repository().update_schedule(name, paused=True)
    return schedule_show(name)


def schedule_resume(name: str) -> dict[str, Any]:
    """Fires at the next cron time from now (the ticks missed while paused are not made up)."""
    from scheduler.cron import parse_cron

    repo = repository()
    record = repo.get_schedule(name)
    next_run_at = parse_cron(record.cron, record.timezone).next_after(utcnow())
    repo.update_schedule(name, paused=False, next_run_at=next_run_at)
    return schedule_show(name)


def schedule_rm(name: str) -> None:
    """Forget the schedule and its catalog's state; its batches and images stay."""
    repository().delete_schedule(name)


def schedule_run(name: str, principal: Principal = LOCAL) -> BatchStatus | UnchangedRun:
    """Run a schedule now, once: a batch of the catalog's new and changed items, or, when there
    are none, an UnchangedRun (no batch: nothing was submitted)."""
    from scheduler.schedules import run_now

    settings = get_settings()
    repo = repository(settings)
    visible_schedule(repo, name, principal)
    result = run_now(repo, storage(settings), settings, name)
    if result.batch_id is None:
        return UnchangedRun(name, result.counts)
    return status(result.batch_id)


# --- webhooks: the deliveries of a batch's final-status call (lcmq.webhooks) -----------------


def webhook_deliveries(batch_id: str, principal: Principal = LOCAL) -> list[dict[str, Any]]:
    """A batch's webhook deliveries (`lcmq webhooks BATCH`): each one's state (pending, delivered
    or failed), its body as sent, and every attempt with its HTTP status or error."""
    import json

    repo = repository()
    visible_batch(repo, batch_id, principal)
    return [
        {
            "id": delivery.id,
            "event": delivery.event,
            "url": delivery.url,
            "state": delivery.state,
            "attempts": delivery.attempts,
            "created_at": _iso(delivery.created_at),
            "next_attempt_at": _iso(delivery.next_attempt_at),
            "delivered_at": _iso(delivery.delivered_at),
            "give_up_at": _iso(delivery.give_up_at),
            "body": json.loads(delivery.body),
            "history": [
                {
                    "attempted_at": _iso(attempt.attempted_at),
                    "status_code": attempt.status_code,
                    "error": attempt.error,
                    "duration_ms": round(attempt.duration_ms, 1),
                }
                for attempt in attempts
            ],
        }
        for delivery, attempts in repo.webhook_deliveries(batch_id)
    ]


# --- the dashboard (lcmq.http.dashboard) --------------------------------------------------

RATE_WINDOW_S = 60.0
PRESIGNED_URL_S = 900  # a gallery page's image links work this long after it was rendered


def images_per_second(
    listed: Sequence[Mapping[str, Any]], window_s: float = RATE_WINDOW_S, principal: Principal = LOCAL
) -> dict[str, float]:
    """Images per second of each listed batch (the dicts of `batches`) over the last `window_s`
    (or over its age, when younger: a batch a few seconds old is not diluted over a minute).
    One query for all of them."""
    now = utcnow()
    owner = ANY_OWNER if principal.admin else principal.owner
    ids = [entry["batch_id"] for entry in listed]
    counts = repository().images_since(ids, now - timedelta(seconds=window_s), owner=owner)
    rates = {}
    for entry in listed:
        age_s = (now - datetime.fromisoformat(entry["created_at"])).total_seconds()
        rates[entry["batch_id"]] = counts.get(entry["batch_id"], 0) / max(1.0, min(window_s, age_s))
    return rates


def gallery(
    batch_id: str, *, after_index: int = -1, limit: int = 200, principal: Principal = LOCAL
) -> list[dict[str, Any]]:
    """Up to `limit` succeeded images after row `after_index`, in row order, each with what made
    it (prompt, seed, parameters) and `src`: a presigned GET URL on S3, None on file:// (the
    dashboard serves those by key)."""
    repo = repository()
    visible_batch(repo, batch_id, principal)
    store = storage()
    shown = []
    for job in repo.jobs_page(batch_id, JobState.succeeded, after_index, limit):
        assert job.key is not None  # a succeeded job has its image
        shown.append(
            {
                "index": job.index,
                "key": job.key,
                "src": store.presigned_url(job.key, PRESIGNED_URL_S),
                "prompt": job.prompt,
                "negative_prompt": job.negative_prompt,
                "seed": job.seed,
                "steps": job.steps,
                "guidance": job.guidance,
                "width": job.width,
                "height": job.height,
                "metadata": job.meta,
                "loras": job.loras,
                "strength": job.strength,
                "control": job.control,
                "worker": job.worker,
                "render_ms": job.render_ms,
            }
        )
    return shown


def stored_file(key: str, principal: Principal = LOCAL) -> Path:
    """The local file of an image of a batch `principal` sees, on file:// storage. Anything else
    is not found, alike: another key's image, a key of no job, a key that leaves the storage
    root, S3 storage (its images are presigned URLs)."""
    from lcmq.errors import PermanentStorageError
    from lcmq.storage import FileStorage

    store = storage()
    missing = NotFoundError(f"no image {key!r}")
    if not isinstance(store, FileStorage):
        raise missing
    try:
        path = store.local_path(key)
    except PermanentStorageError:
        raise missing from None
    repo = repository()
    batch_id = repo.batch_of_object(key)
    if batch_id is None or not principal.sees(repo.get_batch(batch_id).owner) or not path.is_file():
        raise missing
    return path


# --- workers: the farm's rendering processes -------------------------------------------------


def worker_dict(worker: WorkerRecord, now: datetime) -> dict[str, Any]:
    """A worker as `lcmq workers --json` and GET /v1/workers show it.

    images_per_s is over the worker's life (images ÷ seconds from its start to its last
    heartbeat, or its stop): the rate it delivers, idle and load time included, which is what its
    cost is paid for; render_s ÷ images is the pipeline's own speed. cost_per_1000_images follows
    from it (null without a cost or an image)."""
    end = worker.stopped_at or worker.last_seen_at
    wall_s = (end - worker.started_at).total_seconds()
    images_per_s = worker.images / wall_s if worker.images and wall_s > 0 else None
    cost_per_1000 = None
    if worker.cost_per_hour is not None and images_per_s:
        cost_per_1000 = worker.cost_per_hour / 3600 / images_per_s * 1000
    return {
        "node": worker.node,
        "host": worker.host,
        "pid": worker.pid,
        "profile": worker.profile,
        "device": worker.device,
        "batch_size": worker.batch_size,
        "peak_memory_mb": worker.peak_memory_mb,
        "load_s": worker.load_s,
        "model_cache": worker.model_cache,
        "fetch_s": worker.fetch_s,
        "images": worker.images,
        "render_s": worker.render_s,
        "images_per_s": None if images_per_s is None else round(images_per_s, 4),
        "cost_per_hour": worker.cost_per_hour,
        "cost_per_1000_images": None if cost_per_1000 is None else round(cost_per_1000, 6),
        "started_at": worker.started_at.isoformat(),
        "last_seen_at": worker.last_seen_at.isoformat(),
        "stopped_at": _iso(worker.stopped_at),
        "state": worker.state(now),
    }


def workers(principal: Principal = LOCAL, *, include_stopped: bool = False) -> list[dict[str, Any]]:
    """The farm's worker processes, live and stale (no heartbeat for 3 of their intervals: killed
    or cut off), by profile and node; stopped ones too with include_stopped. Workers belong to
    the farm, not to a key: any valid key sees them all (`principal` is who asks)."""
    now = utcnow()
    return [worker_dict(w, now) for w in repository().workers(include_stopped=include_stopped)]


# --- report: images per dollar ------------------------------------------------------------


def report(batch_id: str, principal: Principal = LOCAL) -> dict[str, Any]:
    """What the batch's images took and cost, per worker and in total (formulas: lcmq.costs).

    Covers the images recorded so far: a batch still rendering reports its finished part."""
    repo = repository()
    batch = visible_batch(repo, batch_id, principal)
    sums = repo.worker_job_sums(batch_id)
    per_worker = worker_costs(sums, repo.workers_named([s.worker for s in sums]))
    counts = repo.state_counts(batch_id)
    return {
        "batch_id": batch.id,
        "profile": batch.profile,
        "total": batch.total,
        "failed": counts.get(JobState.failed.value, 0),
        "done": counts.get(JobState.queued.value, 0) + counts.get(JobState.running.value, 0) == 0,
        **batch_costs(per_worker),
        "workers": [w.to_dict() for w in per_worker],
    }
