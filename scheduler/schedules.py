"""Schedule runs: read the catalog afresh, render only what changed, record the catalog's state.

1. Read and check every item of the catalog (nothing is written when one is bad).
2. Compare each item's render key with the catalog's state: new, changed, unchanged, removed.
   An item is unchanged when its last job had the same key and succeeded (or is still on its
   way): nothing is rendered or uploaded again for it.
3. One transaction: advance the schedule (compare-and-set on its version, so of two schedulers,
   or a scheduler and `lcmq schedule run`, exactly one run commits), write the batch of the new
   and changed items, whose jobs carry their stable object key <catalog>/<item_id>.png, and the
   catalog's new state.
4. Publish the batch (as a submit does; the sweeper publishes it if this step is lost).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime

from lcmq.errors import BrokerError, DatabaseError, LcmqError
from lcmq.formats import OutputFormat
from lcmq.models import JobState
from lcmq.profiles import get_profile
from lcmq.repository import ItemState, PendingJob, Repository, ScheduleRecord, utcnow
from lcmq.settings import Settings
from lcmq.spec import BatchOptions
from lcmq.storage import Storage
from scheduler.batches import job_id, job_row, new_batch_id
from scheduler.catalog import CatalogItem, load_items
from scheduler.cron import parse_cron
from scheduler.dispatch import chunk_size_for, publish_batch

log = logging.getLogger("lcmq.scheduler")

# A job in these states has made, or will make, the image its render key describes.
_LIVE_OR_DONE = {JobState.succeeded.value, JobState.queued.value, JobState.running.value}
MANUAL_RUN_TRIES = 5


@dataclass(frozen=True)
class Plan:
    render: list[tuple[CatalogItem, bool]]  # (item, is_new), in catalog order
    unchanged: list[str]
    removed: list[str]

    @property
    def counts(self) -> dict[str, int]:
        new = sum(1 for _, is_new in self.render if is_new)
        return {
            "new": new,
            "changed": len(self.render) - new,
            "unchanged": len(self.unchanged),
            "removed": len(self.removed),
        }


@dataclass(frozen=True)
class RunResult:
    batch_id: str | None  # None: nothing new or changed, so no batch was submitted
    counts: dict[str, int]

    @property
    def unchanged(self) -> bool:
        return self.batch_id is None


@dataclass(frozen=True)
class RunBatch:
    """What a run writes for its new and changed items: the batch row, its job rows, the catalog
    state's entries for them, and the messages to publish."""

    batch: dict
    jobs: list[dict]
    rendered: list[dict]
    pending: list[PendingJob]


def plan_run(items: list[CatalogItem], state: dict[str, ItemState]) -> Plan:
    """new: not in the catalog before; changed: its render key moved (or its last render failed or
    was canceled); unchanged: same key, image made or on its way; removed: gone from the file."""
    render: list[tuple[CatalogItem, bool]] = []
    unchanged: list[str] = []
    for item in items:
        known = state.get(item.item_id)
        if known is not None and known.render_key == item.render_key and known.job_state in _LIVE_OR_DONE:
            unchanged.append(item.item_id)  # an item back after removal keeps its untouched image too
        else:
            render.append((item, known is None or known.removed))
    present = {item.item_id for item in items}
    removed = sorted(item_id for item_id, known in state.items() if not known.removed and item_id not in present)
    return Plan(render, unchanged, removed)


def schedule_options(schedule: ScheduleRecord) -> BatchOptions:
    return BatchOptions(model=schedule.profile, name=schedule.name, **schedule.options)


def run_batch(storage: Storage, schedule: ScheduleRecord, options: BatchOptions, plan: Plan) -> RunBatch:
    """The batch of a run's new and changed items, each job under its stable object key."""
    batch_id = new_batch_id()
    ext = OutputFormat.of(asdict(options)).ext  # the stable key follows the schedule's format
    jobs, rendered, pending = [], [], []
    for index, (item, _) in enumerate(plan.render):
        spec = replace(item.spec, index=index)  # its place in this run's batch
        row = job_row(job_id(batch_id, index), spec, 0) | {
            "key": storage.item_key(schedule.name, item.item_id, ext),
            "render_key": item.render_key,
        }
        jobs.append(row)
        rendered.append({"item_id": item.item_id, "render_key": item.render_key, "job_id": row["id"]})
        pending.append(PendingJob(row["id"], batch_id, spec.render_shape, 0))
    batch = {
        "id": batch_id,
        "name": schedule.name,
        "profile": schedule.profile,
        "total": 0,
        "seed": options.seed or 0,
        "output": storage.catalog_url(schedule.name),
        "options": asdict(options)
        | {"schedule": schedule.name, "catalog": schedule.catalog, "template": schedule.template, "items": plan.counts},
        "idempotency_key": None,
        "priority": 0,
        "owner": schedule.owner,  # a schedule's batches belong to the key that made it
    }
    return RunBatch(batch, jobs, rendered, pending)


def run_schedule(
    repo: Repository,
    storage: Storage,
    settings: Settings,
    schedule: ScheduleRecord,
    *,
    scheduled: bool,
    now: datetime | None = None,
) -> RunResult | None:
    """One run of a schedule as read at `schedule.version`; None when another run committed
    first (nothing is written then). A scheduled run also moves next_run_at to the first cron
    time after now: a schedule missed while no scheduler ran fires once, not once per tick.

    A run with nothing new or changed writes no batch (no empty 0/0 batch, no empty manifest),
    yet still commits: the catalog's state (removed items) and counts, and the next fire time."""
    now = now or utcnow()
    profile = get_profile(schedule.profile)
    options = schedule_options(schedule)
    # A schedule made with an API key reads s3:// only, at every run as at its creation.
    items = load_items(
        schedule.catalog, schedule.template, options, profile, settings, local_files=schedule.owner is None
    )
    plan = plan_run(items, repo.catalog_state(schedule.name))
    counts = plan.counts
    next_run_at = parse_cron(schedule.cron, schedule.timezone).next_after(now) if scheduled else None
    if not plan.render:
        return _record_unchanged_run(repo, schedule, plan, scheduled, next_run_at)
    written = run_batch(storage, schedule, options, plan)
    if not repo.record_catalog_run(
        schedule.name,
        schedule.version,
        written.batch,
        written.jobs,
        written.rendered,
        plan.unchanged,
        plan.removed,
        counts,
        next_run_at,
    ):
        log.info("schedule run lost the race", extra={"schedule": schedule.name, "version": schedule.version})
        return None
    batch_id = written.batch["id"]
    log.info(
        "schedule ran",
        extra={
            "schedule": schedule.name,
            "batch_id": batch_id,
            "scheduled": scheduled,
            "next_run_at": next_run_at,
            **counts,
        },
    )
    try:
        publish_batch(
            repo,
            repo.get_batch(batch_id),
            chunk_size_for(len(written.jobs), settings.chunk_size, settings.max_chunks_per_batch),
            written.pending,
        )
    except BrokerError as exc:
        raise BrokerError(
            f"schedule {schedule.name!r} ran as batch {batch_id}, but its messages could not be "
            f"published ({exc}); the sweeper publishes them, or run `lcmq resume {batch_id}`"
        ) from exc
    return RunResult(batch_id, counts)


def _record_unchanged_run(
    repo: Repository, schedule: ScheduleRecord, plan: Plan, scheduled: bool, next_run_at: datetime | None
) -> RunResult | None:
    """Nothing to render: no batch, but the run counts (its counts, removed items, next fire)."""
    if not repo.record_catalog_run(
        schedule.name,
        schedule.version,
        batch=None,
        jobs=[],
        rendered=[],
        kept=plan.unchanged,
        removed=plan.removed,
        counts=plan.counts,
        next_run_at=next_run_at,
    ):
        log.info("schedule run lost the race", extra={"schedule": schedule.name, "version": schedule.version})
        return None
    log.info(
        "schedule unchanged: nothing submitted",
        extra={"schedule": schedule.name, "scheduled": scheduled, "next_run_at": next_run_at, **plan.counts},
    )
    return RunResult(None, plan.counts)


def run_now(repo: Repository, storage: Storage, settings: Settings, name: str) -> RunResult:
    """`lcmq schedule run`: once, now, whatever the cron says (next_run_at is left alone)."""
    for _ in range(MANUAL_RUN_TRIES):
        result = run_schedule(repo, storage, settings, repo.get_schedule(name), scheduled=False)
        if result is not None:
            return result
    raise DatabaseError(f"schedule {name!r}: other runs kept committing first; try again")


def fire_due(repo: Repository, storage: Storage, settings: Settings, now: datetime | None = None) -> list[str]:
    """Run every due schedule once; returns the batch ids this process created (a run with
    nothing new or changed creates none, yet counts as fired: its next_run_at moves on)."""
    now = now or utcnow()
    fired: list[str] = []
    for schedule in repo.due_schedules(now):
        try:
            result = run_schedule(repo, storage, settings, schedule, scheduled=True, now=now)
        except BrokerError as exc:  # the run is committed; its batch waits for the sweeper
            log.error("schedule ran, publish failed", extra={"schedule": schedule.name, "error": str(exc)})
            continue
        except LcmqError as exc:
            if exc.transient:  # the database or S3 is away: the schedule is still due next tick
                log.error("schedule run failed, retrying", extra={"schedule": schedule.name, "error": str(exc)})
                continue
            # A bad catalog, an unknown profile: record why and wait for the next fire time.
            next_run_at = parse_cron(schedule.cron, schedule.timezone).next_after(now)
            if repo.record_schedule_error(schedule.name, schedule.version, str(exc), next_run_at):
                log.error(
                    "schedule run refused",
                    extra={"schedule": schedule.name, "error": str(exc), "next_run_at": next_run_at},
                )
            continue
        if result is not None and result.batch_id is not None:
            fired.append(result.batch_id)
    return fired
