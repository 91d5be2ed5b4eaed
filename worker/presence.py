"""This worker process's row in `workers`: written at start, kept fresh by a heartbeat thread,
marked stopped at a clean shutdown. `lcmq workers`, GET /v1/workers and the API's /metrics read it.

The process that renders keeps the row: a prefork pool child (the one holding the pipeline),
or with solo/threads the worker's own process. Its node is the Celery node name, and in a pool
child the child's pid after a `#` (`tiny-812@gpu-3#815`): a child that is replaced gets a new row
and its old one goes stale.

The heartbeat must never stop or slow the worker: it runs in a daemon thread of its own, writes
only its own row, and a failed write is logged (at most once a minute) and tried again at the
next beat, which also writes the row afresh if it is missing (the start's write failed).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, replace

from lcmq.repository import Repository, WorkerBeat, WorkerRecord, utcnow
from lcmq.settings import Settings
from worker.counters import COUNTERS
from worker.pipeline import loaded_pipeline

log = logging.getLogger("lcmq.worker")

FAILURE_LOG_EVERY_S = 60.0  # a database that stays away is logged once a minute, not every beat
STOP_WAIT_S = 5.0  # how long a shutdown waits for the last write (the database may be away)


def process_node(node: str, pool_child: bool) -> str:
    """The row's key: unique per process (a pool's children share the Celery node name)."""
    return f"{node}#{os.getpid()}" if pool_child else node


@dataclass(frozen=True)
class Learned:
    """What the load found out: the resolved device, load seconds, the probed batch size."""

    device: str | None = None
    load_s: float | None = None
    batch_size: int | None = None
    model_cache: str | None = None  # s3:// models: hit, miss or partial
    fetch_s: float | None = None


def learned(profile: str) -> Learned:
    loaded = loaded_pipeline(profile)
    if loaded is None:
        return Learned()
    return Learned(loaded.device, round(loaded.load_s, 3), loaded.batch_size, loaded.model_cache, loaded.fetch_s)


def current_beat(profile: str, settings: Settings) -> WorkerBeat:
    totals, load = COUNTERS.totals(), learned(profile)
    return WorkerBeat(
        images=totals.images,
        render_s=round(totals.render_s, 3),
        peak_memory_mb=totals.peak_memory_mb,
        load_s=load.load_s,
        batch_size=load.batch_size or (settings.batch_size if load.load_s is not None else None),
        device=load.device,
        model_cache=load.model_cache,
        fetch_s=load.fetch_s,
    )


class Presence:
    """The row of one worker process and the thread that keeps it fresh."""

    def __init__(self, repo: Repository, record: WorkerRecord, settings: Settings):
        self.repo, self.record, self.settings = repo, record, settings
        self.registered = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lcmq-heartbeat", daemon=True)
        self._failures = 0
        self._last_failure_log = float("-inf")

    @property
    def node(self) -> str:
        return self.record.node

    def start(self) -> Presence:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.beat()  # the first one at once: it writes the row
            if self._stop.wait(self.record.heartbeat_s):
                break
        self._write_stop()

    def beat(self) -> None:
        """One heartbeat; never raises."""
        beat = current_beat(self.record.profile, self.settings)
        try:
            if not self.registered:
                self.repo.upsert_worker(replace(self.record, last_seen_at=utcnow()))
                self.registered = True
            if not self.repo.heartbeat_worker(self.node, beat):
                self.registered = False  # the row is gone: written again at the next beat
        except Exception as exc:  # noqa: BLE001 - any failure waits for the next beat, the worker renders on
            self._failed(exc)
            return
        if self._failures:
            log.info("worker heartbeat written again", extra={"node": self.node, "failed_beats": self._failures})
            self._failures = 0

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_EVERY_S:
            self._last_failure_log = now
            log.warning(
                "worker heartbeat not written; trying again at the next beat",
                extra={"node": self.node, "error": f"{type(exc).__name__}: {exc}", "failed_beats": self._failures},
            )

    def stop(self) -> None:
        """A clean shutdown: the last counters and stopped_at, waiting at most STOP_WAIT_S."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_S)
        else:  # never started (a test), or gone: write it here
            self._write_stop()

    def _write_stop(self) -> None:
        try:
            if self.registered and self.repo.stop_worker(self.node, current_beat(self.record.profile, self.settings)):
                log.info("worker row marked stopped", extra={"node": self.node})
        except Exception as exc:  # noqa: BLE001 - the row goes stale instead
            log.warning("worker row not marked stopped", extra={"node": self.node, "error": str(exc)})


def start_presence(
    repo: Repository, settings: Settings, *, node: str, profile: str, cost_per_hour: float | None
) -> Presence:
    now = utcnow()
    record = WorkerRecord(
        node=node,
        host=socket.gethostname(),
        pid=os.getpid(),
        profile=profile,
        device=settings.device,  # "auto" until the load resolves it
        batch_size=settings.batch_size,
        peak_memory_mb=None,
        load_s=None,
        images=0,
        render_s=0.0,
        cost_per_hour=cost_per_hour,
        heartbeat_s=settings.heartbeat_s,
        started_at=now,
        last_seen_at=now,
        stopped_at=None,
    )
    return Presence(repo, record, settings).start()


# This process's presence, once its start handler ran (None in a prefork parent, which never renders).
_CURRENT: list[Presence] = []


def report_this_process(
    settings: Settings,
    *,
    node: str,
    profile: str,
    pool_child: bool,
    cost_per_hour: float | None,
    metrics_port: int | None,
) -> None:
    """At the start of a process that renders (Celery's worker_process_init in a pool child,
    worker_ready for solo/threads): its row, its heartbeat and, with a port, its metrics."""
    from celery.utils.log import current_process_index

    own_node = process_node(node, pool_child)
    repo = Repository(settings.database_url_resolved)
    _CURRENT.append(start_presence(repo, settings, node=own_node, profile=profile, cost_per_hour=cost_per_hour))
    if metrics_port is not None:
        from worker.metrics import metrics_port_of, serve_metrics

        serve_metrics(metrics_port_of(metrics_port, current_process_index(base=0)), profile, own_node, settings)


def stop_reporting(**_signal_kwargs) -> None:
    """At a clean shutdown (worker_process_shutdown in a pool child, worker_shutdown otherwise)."""
    while _CURRENT:
        _CURRENT.pop().stop()
