"""SQLAlchemy tables. Postgres is the source of truth for job state; Redis only carries ids."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.canceled)
STATE_LENGTH = 16
API_KEY_NAME_LENGTH = 100
# An edge worker's jobs.worker is `edge/<token name>/<node>` (lcmq.workertokens): with a node of
# up to 100 characters it fits the 200 of jobs.worker and workers.node.
WORKER_TOKEN_NAME_LENGTH = 64


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    profile: Mapped[str] = mapped_column(String(100))
    total: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    output: Mapped[str] = mapped_column(Text)  # storage prefix URL of the batch, ends with '/'
    options: Mapped[dict[str, Any]] = mapped_column(JSON)  # the batch defaults as submitted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The same submission twice (even concurrently) finds this key and returns the first batch.
    idempotency_key: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # 0-9, 9 most urgent
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The outbox, batch level: NULL until every job's first message was published. The sweeper
    # publishes batches still NULL after a grace period (a crash between commit and publish).
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The latest job finish that the manifest.jsonl under the batch's prefix covers (set when it
    # is written); NULL: due once the batch finishes (never written, or jobs requeued since).
    manifest_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The API key (its name) that submitted the batch; NULL: the CLI or the Python API, seen
    # only by admin keys. Another key's batch is "not found" to a key.
    owner: Mapped[str | None] = mapped_column(String(API_KEY_NAME_LENGTH))
    # Called once, signed, when every job is final (lcmq.webhooks); NULL: no webhook.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Set in the transaction that writes the batch's final-status webhook delivery: at most one.
    webhook_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_batches_created_at", "created_at"),
        Index("ix_batches_owner_created_at", "owner", "created_at"),
        # The webhook sender's scan (Repository.queue_final_webhooks): only batches whose
        # final webhook is still to be queued are in it.
        Index(
            "ix_batches_webhook_waiting",
            "created_at",
            postgresql_where=text("webhook_url IS NOT NULL AND webhook_queued_at IS NULL"),
            sqlite_where=text("webhook_url IS NOT NULL AND webhook_queued_at IS NULL"),
        ),
        UniqueConstraint("idempotency_key", name="uq_batches_idempotency_key"),
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(STATE_LENGTH), default=JobState.queued.value)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Times the job went back to the queue after a transient fault (S3 or the database away),
    # which uses no attempt: capped by max_handbacks, and its backoff grows with it. The server
    # default covers the COPY of new jobs, which names its columns.
    handbacks: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    key: Mapped[str | None] = mapped_column(Text)  # object key of the image, relative to storage root
    sha256: Mapped[str | None] = mapped_column(String(64))
    render_ms: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)  # images per pipeline call that rendered it
    warning: Mapped[str | None] = mapped_column(Text)  # e.g. the prompt was truncated to the encoder's length
    # When the job's latest message was (or, until its batch is published, will be) sent. NULL:
    # requeued and waiting for a message, which whoever requeued it sends (sweeper, resume).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A catalog item's version: a hash of what decides its pixels (see scheduler/catalog.py).
    render_key: Mapped[str | None] = mapped_column(String(64))
    # Style LoRAs ([{name, path, weight}], sorted by name; NULL: none) and img2img's init image
    # (an s3:// or file:// URL) and strength (NULL: text2img). Part of the render shape.
    loras: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    init_image: Mapped[str | None] = mapped_column(Text)
    strength: Mapped[float | None] = mapped_column(Float)
    # ControlNets / T2I-Adapters ([{name, type, model, image, scale, ...}], lcmq.controls; NULL:
    # none). Part of the render shape without the images, which are per job.
    control: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))

    __table_args__ = (
        UniqueConstraint("batch_id", "index", name="uq_jobs_batch_index"),
        # A batch's jobs in a state (manifests, pages, sums), and the oldest queued message of a
        # batch (dispatched_at: /metrics' queue age) read off the index alone.
        Index("ix_jobs_batch_state_dispatched", "batch_id", "state", "dispatched_at"),
        Index("ix_jobs_state_lease", "state", "lease_until"),
        Index("ix_jobs_state_dispatched", "state", "dispatched_at"),
    )


class BatchCount(Base):
    """A batch's jobs per state, kept exact on Postgres by statement-level triggers on jobs
    (migration 0013): every INSERT, UPDATE or DELETE of job rows adds its moves from state to
    state, one counter write per statement and batch, in the statement's own transaction. So a
    status or a scrape reads a few rows, not 10^6 jobs. SQLite (embedded, small) counts the jobs
    instead and leaves this table empty. A column per JobState value."""

    __tablename__ = "batch_counts"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    queued: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    running: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    succeeded: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    failed: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    canceled: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


SCHEDULE_NAME_LENGTH = 100
SCHEDULE_ZONE_LENGTH = 64
ITEM_ID_LENGTH = 200


class Schedule(Base):
    """A catalog rendered on a cron schedule. The catalog is read afresh at every run."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(SCHEDULE_NAME_LENGTH), primary_key=True)
    catalog: Mapped[str] = mapped_column(Text)  # an absolute path, file:// or s3:// URL
    template: Mapped[str] = mapped_column(Text)  # prompt template: "{name}, {color}, studio photo"
    cron: Mapped[str] = mapped_column(String(200))
    profile: Mapped[str] = mapped_column(String(100))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)  # steps, guidance, size, seed, negative prompt
    paused: Mapped[bool] = mapped_column(Boolean, server_default=false())
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # in UTC
    # The IANA zone the cron fields are wall-clock times in (next_run_at is computed in it).
    timezone: Mapped[str] = mapped_column(String(SCHEDULE_ZONE_LENGTH), server_default="UTC")
    # Bumped by every run in the transaction that writes the run's batch: a run whose diff was
    # computed against an older version (another scheduler fired first) writes nothing.
    version: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_batch_id: Mapped[str | None] = mapped_column(String(32))
    last_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # new/changed/unchanged/removed
    last_error: Mapped[str | None] = mapped_column(Text)  # why the last scheduled run wrote nothing
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    owner: Mapped[str | None] = mapped_column(String(API_KEY_NAME_LENGTH))  # as Batch.owner

    __table_args__ = (Index("ix_schedules_next_run_at", "next_run_at"),)


class CatalogItem(Base):
    """A catalog's current state: each item's latest render key and the job that renders it."""

    __tablename__ = "catalog_items"

    schedule_name: Mapped[str] = mapped_column(ForeignKey("schedules.name", ondelete="CASCADE"), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(ITEM_ID_LENGTH), primary_key=True)
    render_key: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32))  # the job of the image now at its path
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # NULL: in the catalog
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A key of the HTTP API. Only the key's sha256 is stored; the webhook secret is stored as
    is, since signing needs it (it proves a webhook came from lcmq, it opens nothing)."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(API_KEY_NAME_LENGTH), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    webhook_secret: Mapped[str] = mapped_column(Text)
    admin: Mapped[bool] = mapped_column(Boolean, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # NULL: valid
    # NULL: until revoked. The sign-in key `lcmq api` prints expires (and is revoked at its stop).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """The outbox of webhooks: one row per delivery, written with the event it reports and
    retried until a 2xx or its deadline; every attempt is a WebhookAttempt."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(40))  # "batch.final"
    url: Mapped[str] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(API_KEY_NAME_LENGTH))  # whose secret signs it
    body: Mapped[str] = mapped_column(Text)  # the exact bytes signed and sent (UTF-8 JSON)
    state: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed (gave up)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A sender claims the row until then (one conditional update), so two API processes never
    # send the same attempt; an expired claim is taken over.
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    give_up_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("batch_id", "event", name="uq_webhook_deliveries_batch_event"),
        Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),
    )


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_code: Mapped[int | None] = mapped_column(Integer)  # NULL: no response (refused, timeout)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id"),)


class WorkerProcess(Base):
    """One worker process, kept up to date by its heartbeat; live or stale is read from last_seen_at."""

    __tablename__ = "workers"

    node: Mapped[str] = mapped_column(String(200), primary_key=True)  # celery node name, unique per process
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    profile: Mapped[str] = mapped_column(String(100))
    device: Mapped[str] = mapped_column(String(40))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float)
    load_s: Mapped[float | None] = mapped_column(Float)  # pipeline load
    images: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    render_s: Mapped[float] = mapped_column(Float, server_default=text("0"))
    cost_per_hour: Mapped[float | None] = mapped_column(Float)  # --cost-per-hour, any currency
    heartbeat_s: Mapped[float] = mapped_column(Float)  # stale after 3x this without a heartbeat
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # s3:// models fetched at load (worker/model_fetch.py): hit, miss or partial; null without.
    model_cache: Mapped[str | None] = mapped_column(String(10))
    fetch_s: Mapped[float | None] = mapped_column(Float)  # of load_s: manifests, waits, downloads

    __table_args__ = (Index("ix_workers_last_seen_at", "last_seen_at"),)


class WorkerToken(Base):
    """A token of edge workers (lcmq.workertokens): machines that reach the farm only through the
    gateway. Only the token's sha256 is stored. The token claims jobs of `profiles` only, and is
    paused (maintenance) after too many failed jobs in a row until `lcmq workertoken resume`."""

    __tablename__ = "worker_tokens"

    name: Mapped[str] = mapped_column(String(WORKER_TOKEN_NAME_LENGTH), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    profiles: Mapped[list[str]] = mapped_column(JSON)
    cost_per_hour: Mapped[float | None] = mapped_column(Float)  # of each of its workers, any currency
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # NULL: valid
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # NULL: may claim
    failures_in_a_row: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_claim_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
