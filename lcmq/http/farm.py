"""The farm seen from outside: GET /v1/workers (any valid key) and GET /metrics (Prometheus, no key).

/metrics is read at scrape time by one collector (FarmCollector), each part from where it is
true: job counts and the age of the oldest queued job from the database, queue depths from the
broker, live workers from their rows. A part that cannot be read (its service is away) is left
out of that scrape and `lcmq_metrics_part_up{part}` says so; the others are still served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from lcmq import api
from lcmq.errors import LcmqError
from lcmq.http.auth import Caller, bearer
from lcmq.http.schemas import INVALID, UNAUTHORIZED
from lcmq.models import FINAL_STATES, JobState
from lcmq.profiles import load_profiles
from lcmq.queue import queue_depths
from lcmq.repository import Repository, utcnow
from lcmq.settings import Settings

log = logging.getLogger("lcmq.http")

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], responses=UNAUTHORIZED | INVALID)

UNFINISHED_STATES = (JobState.queued, JobState.running)


class WorkerOut(BaseModel):
    """A worker process as `lcmq workers --json` shows it (docs/cli.md#lcmq-workers)."""

    node: str = Field(description="the Celery node name; a prefork pool process adds #<its pid>")
    host: str
    pid: int
    profile: str
    device: str = Field(description='cpu, cuda or mps once loaded ("auto" until then)')
    batch_size: int | None
    peak_memory_mb: float | None
    load_s: float | None = Field(description="seconds the pipeline took to load; null while loading")
    model_cache: str | None = Field(
        None, description="s3:// models at load: hit (cached on the host), miss (downloaded) or partial; null without"
    )
    fetch_s: float | None = Field(None, description="of load_s, the seconds spent fetching s3:// models")
    images: int
    render_s: float
    images_per_s: float | None = Field(description="images over the seconds from its start to its last heartbeat")
    cost_per_hour: float | None = Field(description="as given to `lcmq worker --cost-per-hour`, any currency")
    cost_per_1000_images: float | None
    started_at: str
    last_seen_at: str
    stopped_at: str | None
    state: str = Field(description="live, stale (no heartbeat for 3 intervals) or stopped")


class WorkerList(BaseModel):
    data: list[WorkerOut]


@v1.get("/workers", tags=["workers"], response_model=WorkerList)
def list_workers(
    caller: Caller,
    include_stopped: Annotated[bool, Query(alias="all", description="stopped workers too")] = False,
) -> dict[str, list[dict[str, Any]]]:
    """The farm's worker processes, live and stale (stopped ones too with `all=true`). Workers
    belong to the farm: every valid key sees them all."""
    return {"data": api.workers(principal=caller, include_stopped=include_stopped)}


@router.get(
    "/metrics",
    tags=["metrics"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> Response:
    """Prometheus text format, no key needed (see docs/metrics.md)."""
    state = request.app.state
    with _REGISTRY_LOCK:  # the first scrapes of a new app may arrive together
        if getattr(state, "farm_metrics", None) is None:
            registry = CollectorRegistry()
            registry.register(FarmCollector(state.repo, state.settings))
            state.farm_metrics = registry
    return Response(generate_latest(state.farm_metrics), media_type=CONTENT_TYPE_LATEST)


_REGISTRY_LOCK = threading.Lock()


class FinalCounts:
    """Succeeded, failed and canceled jobs per profile, recounted at most every `max_age_s`
    where they are counted from the jobs (SQLite); read at every scrape where the database keeps
    per-batch counters (Postgres: a row per batch, whatever the jobs, Repository.keeps_counts).

    The trade, where counted: a count of final jobs reads every job ever rendered, too much for
    a scrape every 15 s on a large table; queued and running jobs are few next to them and
    counted at every scrape. So there the final counts may lag by up to
    LCMQ_METRICS_FINAL_COUNTS_S (default 60 s; 0: every scrape), fine for graphs and alerts on
    failure rates; the scaling signals are never cached."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self.counts: dict[tuple[str, str], int] = {}
        self.read_at = float("-inf")
        self._lock = threading.Lock()

    def get(self, repo: Repository) -> dict[tuple[str, str], int]:
        with self._lock:
            if repo.keeps_counts or time.monotonic() - self.read_at >= self.max_age_s:
                self.counts = repo.job_counts_by_profile(FINAL_STATES)
                self.read_at = time.monotonic()
            return self.counts


class FarmCollector(Collector):
    def __init__(self, repo: Repository, settings: Settings):
        self.repo, self.settings = repo, settings
        self.final_counts = FinalCounts(settings.metrics_final_counts_s)

    def collect(self) -> Iterator[Metric]:
        # Every profile this install knows has a series (0 when idle): a scaler needs a value, not a gap.
        profiles = set(load_profiles())
        parts_up = GaugeMetricFamily(
            "lcmq_metrics_part_up",
            "1 when this part of the scrape could be read, 0 when its service is away.",
            labels=["part"],
        )
        for part, read in (
            ("jobs", self._jobs),
            ("queue_oldest", self._oldest),
            ("queue_depth", self._queue_depth),
            ("workers", self._workers_live),
        ):
            try:
                families = list(read(profiles))
            except LcmqError as exc:
                log.warning("metrics part not read", extra={"part": part, "error": str(exc)})
                parts_up.add_metric([part], 0)
                continue
            parts_up.add_metric([part], 1)
            yield from families
        yield parts_up

    def _jobs(self, profiles: set[str]) -> Iterator[Metric]:
        counts = self.repo.job_counts_by_profile(UNFINISHED_STATES) | self.final_counts.get(self.repo)
        family = GaugeMetricFamily("lcmq_jobs", "Jobs by state, per model profile.", labels=["profile", "state"])
        for profile in sorted(profiles | {profile for profile, _ in counts}):
            for state in JobState:
                family.add_metric([profile, state.value], counts.get((profile, state.value), 0))
        yield family

    def _oldest(self, profiles: set[str]) -> Iterator[Metric]:
        oldest = self.repo.oldest_queued_by_profile()
        now = utcnow()
        family = GaugeMetricFamily(
            "lcmq_queue_oldest_seconds",
            "Age of the oldest queued job's message, per profile (0: none waiting). The signal to scale workers on.",
            labels=["profile"],
        )
        for profile in sorted(profiles | set(oldest)):
            since = oldest.get(profile)
            family.add_metric([profile], max(0.0, (now - since).total_seconds()) if since else 0.0)
        yield family

    def _queue_depth(self, profiles: set[str]) -> Iterator[Metric]:
        depths = queue_depths(sorted(profiles))  # the scrape runs in FastAPI's thread pool, off the loop
        family = GaugeMetricFamily(
            "lcmq_queue_depth", "Messages waiting in render.<profile>, every priority list summed.", labels=["profile"]
        )
        for profile, depth in sorted(depths.items()):
            family.add_metric([profile], depth)
        yield family

    def _workers_live(self, profiles: set[str]) -> Iterator[Metric]:
        now = utcnow()
        live: dict[str, int] = dict.fromkeys(profiles, 0)
        for worker in self.repo.workers():
            if worker.state(now) == "live":
                live[worker.profile] = live.get(worker.profile, 0) + 1
        family = GaugeMetricFamily(
            "lcmq_workers_live", "Worker processes with a recent heartbeat, per profile.", labels=["profile"]
        )
        for profile, count in sorted(live.items()):
            family.add_metric([profile], count)
        yield family
