"""The edge gateway: `/gateway/v1/*`, the only door of edge workers (docs/edge.md).

An edge worker holds one worker token (lcmq.workertokens) and nothing else: it claims jobs of
its token's profiles here, uploads each image to a presigned PUT URL issued for exactly that
job's key, and records it; the gateway vouches for the image by reading the object back and
hashing it. Every call acts only on the jobs whose worker is `edge/<token>/<node>`.

Limits: the body size (BodyLimit on /gateway/, installed by create_app), jobs per claim,
claims per second per token (in this process: N API processes allow N times the rate), and a
token that fails too many jobs in a row is paused (423) until `lcmq workertoken resume`.
The routes are left out of /openapi.json (they are not the /v1 API, and no API key opens them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lcmq.errors import PermanentStorageError
from lcmq.formats import OutputFormat
from lcmq.manifest import write_manifest
from lcmq.repository import (
    BatchRecord,
    JobRecord,
    Repository,
    StoredImage,
    WorkerBeat,
    WorkerRecord,
    WorkerTokenRecord,
    utcnow,
)
from lcmq.settings import Settings
from lcmq.storage import S3Storage, Storage, storage_from_settings
from lcmq.workertokens import NODE_PATTERN, authenticate, edge_worker

log = logging.getLogger("lcmq.http.gateway")

PREFIX = "/gateway/v1"
POLL_S = 0.5  # a waiting claim asks the database this often
NOT_HELD = "not held"
SHA256_MISMATCH = "sha256 mismatch"
MAX_IDS = 1000  # job ids in one renew, fail or hand-back (the body limit bounds them too)

router = APIRouter(prefix=PREFIX, include_in_schema=False)


class GatewayRefusal(Exception):
    """A refusal with its status; answered as `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


async def refusal_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayRefusal)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


class ClaimRate:
    """Claims per second per token, in this process: a token bucket of `rate` tokens a second
    that holds at most max(1, rate), so a worker may claim at once after a quiet spell."""

    def __init__(self, rate: float):
        self.rate, self.capacity = rate, max(1.0, rate)
        self._buckets: dict[str, tuple[float, float]] = defaultdict(lambda: (self.capacity, time.monotonic()))
        self._lock = threading.Lock()

    def take(self, token: str) -> float:
        """0 when a claim may go; else the seconds until the next one may."""
        with self._lock:
            level, then = self._buckets[token]
            now = time.monotonic()
            level = min(self.capacity, level + (now - then) * self.rate)
            if level >= 1:
                self._buckets[token] = (level - 1, now)
                return 0.0
            self._buckets[token] = (level, now)
            return (1 - level) / self.rate


@dataclass
class Gateway:
    """What the routes share: settings, the repository, the storage (made at first use) and the
    claim rate of each token."""

    settings: Settings
    repo: Repository
    rate: ClaimRate
    _storage: Storage | None = None

    @property
    def storage(self) -> S3Storage:
        if self._storage is None:
            self._storage = storage_from_settings(self.settings)
        if not isinstance(self._storage, S3Storage):
            raise GatewayRefusal(
                503, "edge workers need s3:// storage (LCMQ_STORAGE_URL): nothing can presign a file://"
            )
        return self._storage


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def edge_token(request: Request) -> WorkerTokenRecord:
    """The caller's worker token; 401 without a valid one (unknown, revoked, an API key)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else ""
    record = authenticate(gateway_of(request).repo, token) if token else None
    if record is None:
        raise GatewayRefusal(
            401,
            "a valid worker token is needed: Authorization: Bearer lcmqw_... (lcmq workertoken create NAME)",
            {"WWW-Authenticate": "Bearer"},
        )
    request.state.principal = EdgeCaller(f"workertoken:{record.name}")  # the access log's name
    return record


@dataclass(frozen=True)
class EdgeCaller:
    name: str


Token = Annotated[WorkerTokenRecord, Depends(edge_token)]
GatewayDep = Annotated[Gateway, Depends(gateway_of)]
Node = Annotated[str, Field(pattern=NODE_PATTERN, description="the edge worker's own name")]
JobIds = Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=MAX_IDS)]


def own_profile(token: WorkerTokenRecord, profile: str) -> None:
    if profile not in token.profiles:
        raise GatewayRefusal(
            403, f"worker token {token.name!r} may not serve profile {profile!r} (its profiles: {token.profiles})"
        )


def not_paused(token: WorkerTokenRecord) -> None:
    if token.paused_at is not None:
        raise GatewayRefusal(
            423,
            f"worker token {token.name!r} is paused after {token.failures_in_a_row} failed jobs in a row; "
            f"fix the machine, then: lcmq workertoken resume {token.name}",
        )


# --- hello, heartbeat, stopped: the worker's row in `workers` ---------------------------------


class HelloIn(BaseModel):
    node: Node
    host: str = Field(max_length=200)
    pid: int = Field(ge=0)
    profile: str = Field(max_length=100)
    device: str = Field("auto", max_length=40)
    batch_size: int | None = Field(None, ge=1)


@router.post("/hello")
def hello(body: HelloIn, token: Token, gateway: GatewayDep) -> dict[str, Any]:
    own_profile(token, body.profile)
    not_paused(token)
    settings, now = gateway.settings, utcnow()
    worker = edge_worker(token.name, body.node)
    gateway.repo.upsert_worker(
        WorkerRecord(
            node=worker,
            host=body.host,
            pid=body.pid,
            profile=body.profile,
            device=body.device,
            batch_size=body.batch_size,
            peak_memory_mb=None,
            load_s=None,
            images=0,
            render_s=0.0,
            cost_per_hour=token.cost_per_hour,
            heartbeat_s=settings.heartbeat_s,
            started_at=now,
            last_seen_at=now,
            stopped_at=None,
        )
    )
    return {
        "worker": worker,
        "lease_s": settings.lease_s,
        "heartbeat_s": settings.heartbeat_s,
        "max_claim": settings.gateway_max_claim,
        "wait_max_s": settings.gateway_wait_max_s,
    }


class HeartbeatIn(BaseModel):
    node: Node
    images: int = Field(0, ge=0)
    render_s: float = Field(0.0, ge=0)
    peak_memory_mb: float | None = Field(None, ge=0)
    load_s: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    device: str | None = Field(None, max_length=40)
    model_cache: Literal["hit", "miss", "partial"] | None = None  # s3:// models at load
    fetch_s: float | None = Field(None, ge=0)  # of load_s, the seconds spent fetching them

    def beat(self) -> WorkerBeat:
        return WorkerBeat(
            self.images,
            self.render_s,
            self.peak_memory_mb,
            self.load_s,
            self.batch_size,
            self.device,
            self.model_cache,
            self.fetch_s,
        )


@router.post("/heartbeat")
def heartbeat(body: HeartbeatIn, token: Token, gateway: GatewayDep) -> dict[str, bool]:
    """ok false: the row is gone (say hello again)."""
    return {"ok": gateway.repo.heartbeat_worker(edge_worker(token.name, body.node), body.beat())}


class StoppedIn(BaseModel):
    node: Node
    images: int | None = Field(None, ge=0)
    render_s: float | None = Field(None, ge=0)


@router.post("/stopped")
def stopped(body: StoppedIn, token: Token, gateway: GatewayDep) -> dict[str, bool]:
    node = edge_worker(token.name, body.node)
    row = gateway.repo.worker_row(node)
    if row is None:
        return {"ok": False}
    images = row.images if body.images is None else body.images
    render_s = row.render_s if body.render_s is None else body.render_s
    return {"ok": gateway.repo.stop_worker(node, WorkerBeat(images, render_s))}


# --- claim ------------------------------------------------------------------------------------


class ClaimIn(BaseModel):
    node: Node
    profile: str = Field(max_length=100)
    max_jobs: int = Field(1, ge=1, description="capped at LCMQ_GATEWAY_MAX_CLAIM")
    wait_s: float = Field(0, ge=0, description="capped at LCMQ_GATEWAY_WAIT_MAX_S")


def presigned_get(storage: S3Storage, url: str | None, ttl_s: int) -> str | None:
    """A GET URL of an s3:// object the job names (claims skip jobs that name local files)."""
    if not url or not url.startswith("s3://"):
        return None
    bucket, _, key = url[len("s3://") :].partition("/")
    return storage.presigned_get(bucket, key, ttl_s)


def image_key(storage: Storage, job: JobRecord, batch: BatchRecord) -> tuple[str, OutputFormat]:
    output = OutputFormat.of(batch.options)
    return storage.job_image_key(job.key, job.batch_id, job.index, output.ext), output


def edge_job(job: JobRecord, batch: BatchRecord, storage: S3Storage, ttl_s: int) -> dict[str, Any]:
    """Everything an edge worker needs to render, encode and upload one job (docs/edge.md)."""
    key, output = image_key(storage, job, batch)
    loras = None
    if job.loras is not None:
        loras = [
            {"name": lora["name"], "weight": lora["weight"], "url": presigned_get(storage, lora["path"], ttl_s)}
            for lora in job.loras
        ]
    return {
        "job_id": job.id,
        "batch_id": job.batch_id,
        "index": job.index,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": job.steps,
        "guidance": job.guidance,
        "width": job.width,
        "height": job.height,
        "metadata": job.meta,
        "attempts": job.attempts,
        "strength": job.strength,
        "render_key": job.render_key,
        "loras": loras,
        "init_image_url": presigned_get(storage, job.init_image, ttl_s),
        "output": {"format": output.name, "quality": output.quality},
        "key": key,
        "upload": {
            "method": "PUT",
            "url": storage.presigned_put_url(key, ttl_s, output.content_type),
            "headers": {"Content-Type": output.content_type},
            "expires_at": (utcnow() + timedelta(seconds=ttl_s)).isoformat(),
        },
    }


def edge_jobs(gateway: Gateway, jobs: list[JobRecord]) -> list[dict[str, Any]]:
    storage, ttl_s = gateway.storage, gateway.settings.gateway_url_ttl_s
    batches = {batch_id: gateway.repo.get_batch(batch_id) for batch_id in {job.batch_id for job in jobs}}
    return [edge_job(job, batches[job.batch_id], storage, ttl_s) for job in jobs]


@router.post("/claim")
async def claim(body: ClaimIn, token: Token, gateway: GatewayDep, request: Request) -> dict[str, Any]:
    """Up to max_jobs jobs of the profile; long-polls up to wait_s for the first, asking the
    database every POLL_S without holding a thread while it waits."""
    own_profile(token, body.profile)
    not_paused(token)
    settings = gateway.settings
    await run_in_threadpool(lambda: gateway.storage)  # 503 before anything is claimed on file://
    wait_s = gateway.rate.take(token.name)
    if wait_s:
        retry = max(1, round(wait_s + 0.5))
        raise GatewayRefusal(
            429,
            f"more than {settings.gateway_claims_per_s:g} claims per second (LCMQ_GATEWAY_CLAIMS_PER_S)",
            {"Retry-After": str(retry)},
        )
    worker = edge_worker(token.name, body.node)
    max_jobs = min(body.max_jobs, settings.gateway_max_claim)
    deadline = time.monotonic() + min(body.wait_s, settings.gateway_wait_max_s)
    while True:
        if await request.is_disconnected():  # claimed now, the jobs would wait out their lease
            return {"lease_s": settings.lease_s, "jobs": []}
        jobs = await run_in_threadpool(
            gateway.repo.claim_next,
            body.profile,
            max_jobs,
            worker,
            settings.lease_s,
            settings.max_attempts,
            token=token.name,
        )
        if jobs:
            return {"lease_s": settings.lease_s, "jobs": await run_in_threadpool(edge_jobs, gateway, jobs)}
        left = deadline - time.monotonic()
        if left <= 0:
            return {"lease_s": settings.lease_s, "jobs": []}
        await asyncio.sleep(min(POLL_S, left))


# --- renew, record, fail, hand back: only jobs this worker holds -------------------------------


class RenewIn(BaseModel):
    node: Node
    job_ids: JobIds


def held_ids(repo: Repository, job_ids: list[str], worker: str) -> list[str]:
    return [job.id for job in repo.jobs_by_id(job_ids) if job.state == "running" and job.worker == worker]


@router.post("/renew")
def renew(body: RenewIn, token: Token, gateway: GatewayDep) -> dict[str, list[str]]:
    worker = edge_worker(token.name, body.node)
    gateway.repo.extend_leases(body.job_ids, worker, gateway.settings.lease_s)
    return {"renewed": held_ids(gateway.repo, body.job_ids, worker)}


class ResultIn(BaseModel):
    job_id: str = Field(max_length=32)
    key: str = Field(max_length=1000)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    render_ms: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    warning: str | None = Field(None, max_length=4000)


class RecordIn(BaseModel):
    node: Node
    results: list[ResultIn] = Field(max_length=MAX_IDS)


@dataclass
class Verdicts:
    recorded: list[str] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    to_record: list[StoredImage] = field(default_factory=list)
    batch_of: dict[str, str] = field(default_factory=dict)  # of the jobs to record

    def refuse(self, job_id: str, reason: str) -> None:
        self.refused.append({"job_id": job_id, "reason": reason})


def judge(gateway: Gateway, results: list[ResultIn], worker: str) -> Verdicts:
    """Which results may be recorded: held by this worker, at the job's own key, and an object
    there whose bytes hash to the sha256 given. A job this worker already recorded with the same
    key and sha256 counts as recorded (a retry after a lost response)."""
    repo, storage = gateway.repo, gateway.storage
    max_bytes = int(gateway.settings.gateway_max_object_mb * (1 << 20))
    jobs = {job.id: job for job in repo.jobs_by_id([r.job_id for r in results])}
    batches: dict[str, BatchRecord] = {}
    verdicts = Verdicts()
    for result in results:
        job = jobs.get(result.job_id)
        if job is None or job.worker != worker:
            verdicts.refuse(result.job_id, NOT_HELD)
        elif job.state == "succeeded" and (job.key, job.sha256) == (result.key, result.sha256):
            verdicts.recorded.append(job.id)
        elif job.state != "running":
            verdicts.refuse(result.job_id, NOT_HELD)
        else:
            if job.batch_id not in batches:
                batches[job.batch_id] = repo.get_batch(job.batch_id)
            key, _ = image_key(storage, job, batches[job.batch_id])
            if result.key != key:
                verdicts.refuse(job.id, f"wrong key: this job's image goes to {key!r}")
                continue
            try:
                stored = storage.read_sha256(key, max_bytes)
            except PermanentStorageError as exc:  # too large, or refused: a transient fault is a 503
                verdicts.refuse(job.id, str(exc))
                continue
            if stored is None:
                verdicts.refuse(job.id, f"no object at {key!r}: upload it to the claim's URL first")
            elif stored != result.sha256:
                verdicts.refuse(job.id, SHA256_MISMATCH)
            else:
                verdicts.to_record.append(
                    StoredImage(job.id, key, result.sha256, result.render_ms, result.batch_size, result.warning)
                )
                verdicts.batch_of[job.id] = job.batch_id
    return verdicts


def write_manifests(repo: Repository, storage: Storage, batch_ids: set[str]) -> None:
    """After the response: the manifest of each batch that these records finished (the sweeper
    writes any that fail here)."""
    for batch_id in sorted(batch_ids):
        try:
            write_manifest(repo, storage, batch_id)
        except Exception as exc:  # noqa: BLE001 - the images are recorded; the sweeper writes it later
            log.warning("manifest not written", extra={"batch_id": batch_id, "error": f"{type(exc).__name__}: {exc}"})


@router.post("/record")
def record(body: RecordIn, token: Token, gateway: GatewayDep, background: BackgroundTasks) -> JSONResponse:
    worker = edge_worker(token.name, body.node)
    verdicts = judge(gateway, body.results, worker)
    repo = gateway.repo
    if verdicts.to_record:
        recorded_now = repo.record_successes(verdicts.to_record, worker)
        stored = {image.job_id: image for image in verdicts.to_record}
        if recorded_now < len(verdicts.to_record):  # leases lost between the check and the write
            rows = {job.id: job for job in repo.jobs_by_id(list(stored))}
            lost = [
                job_id
                for job_id, image in stored.items()
                if not (rows[job_id].state == "succeeded" and rows[job_id].sha256 == image.sha256)
            ]
            for job_id in lost:
                verdicts.refuse(job_id, NOT_HELD)
                stored.pop(job_id)
        verdicts.recorded.extend(stored)
        if stored:
            repo.reset_token_failures(token.name)
            batch_ids = {verdicts.batch_of[job_id] for job_id in stored}
            background.add_task(write_manifests, repo, gateway.storage, batch_ids)
    all_not_held = bool(verdicts.refused) and all(r["reason"] == NOT_HELD for r in verdicts.refused)
    status = 409 if all_not_held and not verdicts.recorded else 200
    return JSONResponse({"recorded": verdicts.recorded, "refused": verdicts.refused}, status_code=status)


class FailIn(BaseModel):
    node: Node
    job_ids: JobIds
    error: str = Field(max_length=4000)


@router.post("/fail")
def fail(body: FailIn, token: Token, gateway: GatewayDep) -> dict[str, Any]:
    """Fail held jobs with the worker's reason; they count towards the token's pause."""
    repo = gateway.repo
    failed = repo.record_failure(body.job_ids, edge_worker(token.name, body.node), f"edge worker: {body.error}")
    paused = failed > 0 and repo.count_token_failures(
        token.name, failed, gateway.settings.gateway_max_failures_in_a_row
    )
    return {"failed": failed, "paused": paused}


class HandbackIn(BaseModel):
    node: Node
    job_ids: JobIds
    error: str | None = Field(None, max_length=4000)


@router.post("/handback")
def handback(body: HandbackIn, token: Token, gateway: GatewayDep) -> dict[str, int]:
    """Back to the queue at once, no attempt counted (a preempted box, a passing fault), like a
    Celery worker's hand-back; the sweeper sends their message for Celery workers."""
    handed = gateway.repo.release(
        body.job_ids,
        edge_worker(token.name, body.node),
        body.error,
        max_handbacks=gateway.settings.max_handbacks,
        publish_later=True,
    )
    return {"released": len(handed.requeued)}


def install(app: FastAPI, settings: Settings, repo: Repository) -> None:
    app.state.gateway = Gateway(settings, repo, ClaimRate(settings.gateway_claims_per_s))
    app.add_exception_handler(GatewayRefusal, refusal_response)
    app.include_router(router)
    from lcmq.http import gateway_models  # its routes import this module's dependencies

    app.include_router(gateway_models.router)
