"""`lcmq worker --model P --gateway URL --token T`: an edge worker, for a machine the farm does
not trust (a rented GPU). No Celery, no database, no broker, no bucket credentials: it speaks only
to the gateway (worker/gateway_client.py), and renders with the same render loop and store
pipeline as a Celery worker (worker/batch_render.py, worker/store.py) over the gateway adapters.

The loop: hello; then claim (long-poll) up to a micro-batch of jobs of the profile, render,
hand the images to the store pipeline (upload to the presigned PUT, record — retried until the
gateway acknowledges), claim the next. The lease ledger renews what is held in the background
and drops the jobs the gateway no longer renews; a heartbeat thread keeps the worker's row.
The gateway away, 5xx or 429: back off with jitter (capped) and try again; nothing held is lost.

SIGTERM (a spot instance's notice): the micro-batch being rendered finishes, is uploaded and
recorded, the jobs claimed and not rendered are handed back in one call, and the process exits 0
— all within --grace-s; past it, whatever is still held is handed back and the process exits.
A hard kill costs only the leases: the jobs come back when they run out.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from itertools import groupby

from lcmq.errors import ConfigError, LcmqError, is_transient
from lcmq.profiles import NULL_FAMILY, Profile
from lcmq.settings import Settings
from worker.batch_render import MicroBatchRenderer
from worker.counters import COUNTERS
from worker.gateway_client import (
    Claimed,
    GatewayClient,
    GatewayJobStore,
    GatewayObjectStore,
    GatewayRefused,
    GatewayUnavailable,
    backoff_s,
)
from worker.gateway_models import GatewaySource
from worker.leases import LeaseLedger
from worker.pipeline import check_device, pinned_pipeline
from worker.presence import current_beat
from worker.render import micro_batches
from worker.store import StoreContext, StorePipeline

log = logging.getLogger("lcmq.worker")

CLAIM_WAIT_S = 5.0  # a long-poll this long at most: a SIGTERM waits for it to come back
HELLO_PATIENCE_S = 300.0  # a worker started before its gateway waits this long for it
PAUSED_WAIT_S = 30.0  # a paused token (423) asks again this often, until its owner resumes it
GONE_STATUSES = (401, 403)  # revoked, or not allowed this profile: the worker stops


@dataclass(frozen=True)
class EdgeOptions:
    gateway: str
    token: str
    node: str
    grace_s: float = 20.0
    cost_per_hour: float | None = None  # the token's cost is what the gateway records


class Shutdown:
    """The SIGTERM flag, and the deadline the grace period sets."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.deadline: float | None = None

    def request(self, grace_s: float) -> None:
        if not self.requested.is_set():
            self.deadline = time.monotonic() + grace_s
            self.requested.set()


class EdgeWorker:
    def __init__(self, profile: Profile, settings: Settings, options: EdgeOptions):
        self.profile, self.settings, self.options = profile, settings, options
        self.client = GatewayClient(options.gateway, options.token, options.node)
        self.objects = GatewayObjectStore()
        self.shutdown = Shutdown()
        self.jobs: GatewayJobStore | None = None
        self.heartbeat_s = settings.heartbeat_s
        self.wait_s = CLAIM_WAIT_S
        self.store: StorePipeline | None = None
        self._beats = threading.Event()

    # --- start -------------------------------------------------------------------------------

    def hello(self) -> GatewayJobStore:
        """Introduce this worker; the gateway answers its name and the lease and claim limits."""
        answer = self.client.call_patiently("/hello", self._hello_body(), patience_s=HELLO_PATIENCE_S)
        self.heartbeat_s = float(answer.get("heartbeat_s") or self.heartbeat_s)
        self.wait_s = min(CLAIM_WAIT_S, float(answer.get("wait_max_s", CLAIM_WAIT_S)))
        self.lease_s = float(answer["lease_s"])
        self.max_claim = int(answer.get("max_claim", self.settings.batch_size))
        return GatewayJobStore(self.client, answer["worker"], self.objects, self.profile.name)

    def _hello_body(self) -> dict:
        beat = current_beat(self.profile.name, self.settings)
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "profile": self.profile.name,
            "device": beat.device or self.settings.device,
            "batch_size": beat.batch_size or self.settings.batch_size,
        }

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self.jobs = jobs = self.hello()  # first: a token the gateway refuses stops the start at once
        # Before the first claim (leases are short); s3:// models come through the gateway.
        loaded = pinned_pipeline(self.profile, self.settings, GatewaySource(self.client, self.profile))
        self._send_beat()  # the row shows the load (load_s, model_cache) at once, not a beat later
        size = min(loaded.batch_size or self.settings.batch_size, self.max_claim)
        ledger = LeaseLedger(self.lease_s).start()
        self.store = store = StorePipeline(ledger)
        renderer = MicroBatchRenderer(store, self.settings)
        heartbeat = threading.Thread(target=self._beat, name="lcmq-edge-heartbeat", daemon=True)
        heartbeat.start()
        log.info(
            "edge worker ready.",
            extra={"worker": jobs.worker, "gateway": self.client.url, "profile": self.profile.name, "batch_size": size},
        )
        attempt = 0
        try:
            while not self.shutdown.requested.is_set():
                try:
                    claimed = jobs.claim_next(size, self.wait_s)
                    attempt = 0
                except GatewayUnavailable as exc:
                    self._wait(max(backoff_s(attempt), exc.retry_after_s or 0.0), "claim", exc)
                    attempt += 1
                    continue
                except GatewayRefused as exc:
                    if exc.status in GONE_STATUSES:
                        raise
                    self._wait(PAUSED_WAIT_S if exc.status == 423 else backoff_s(attempt), "claim", exc)
                    attempt += 1
                    continue
                if claimed:
                    started = time.perf_counter()
                    ledger.hold(jobs, [c.job.id for c in claimed], self)
                    self._render(loaded, renderer, claimed, size)
                    COUNTERS.busy(time.perf_counter() - started)
        finally:
            self._stop(ledger, store)

    def _render(self, loaded, renderer: MicroBatchRenderer, claimed: list[Claimed], size: int) -> None:
        """The claimed jobs, batch by batch, a micro-batch at a time; once SIGTERM came, the
        ones not started are handed back."""
        assert self.jobs is not None
        for _, same_batch in groupby(claimed, key=lambda c: c.batch.id):
            group = list(same_batch)
            context = StoreContext(self.jobs, self.objects, group[0].batch, self.settings.max_handbacks)
            for micro in micro_batches([c.job for c in group], size):
                if self.shutdown.requested.is_set():
                    return  # the rest: handed back by _stop, in one call
                # A job the renew no longer returned (canceled, or another worker's) is skipped.
                micro = [job for job in micro if renderer.leases.holds(job.id)]
                if not micro:
                    continue
                if any(job.attempts > 1 for job in micro):  # maybe a poison job: nothing else storing
                    self._absorb(renderer, renderer.store.drain())
                try:
                    renderer.render_then_store(loaded, context, micro)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self._hand_back_held(f"{type(exc).__name__}: {exc}")
                    self._wait(backoff_s(2), "render", exc)
                    return

    def _absorb(self, renderer: MicroBatchRenderer, outcomes) -> None:
        try:
            renderer.absorb(outcomes)
        except LcmqError as exc:  # handed back by the store pipeline already: just slow down
            self._wait(backoff_s(2), "store", exc)

    def _wait(self, delay_s: float, what: str, exc: Exception) -> None:
        log.warning(
            "gateway call failed, backing off", extra={"call": what, "error": str(exc), "delay_s": round(delay_s, 2)}
        )
        self.shutdown.requested.wait(delay_s)

    # --- stop ----------------------------------------------------------------------------------

    def _hand_back_held(self, reason: str) -> None:
        """The jobs this loop holds and has not given to the store pipeline, in one call."""
        if self.store is None or not (held := self.store.leases.held_by(self)):
            return
        try:
            self.store.leases.hand_back(held, reason, self.settings.max_handbacks)
        except LcmqError as exc:  # the gateway is away: their leases run out instead
            log.error("jobs not handed back", extra={"jobs": len(held), "error": str(exc)})

    def _stop(self, ledger: LeaseLedger, store: StorePipeline) -> None:
        """Hand back what was claimed and not rendered, let the store pipeline record what was,
        say stopped. Within the grace period (the watchdog ends it past that)."""
        self._hand_back_held("worker stopping: handed back")
        outcomes = store.drain()
        log.info("edge worker stopped", extra={"stored_micro_batches": len(outcomes)})
        ledger.stop()
        self._beats.set()
        self._say_stopped()

    def _say_stopped(self) -> None:
        totals = COUNTERS.totals()
        try:
            self.client.call("/stopped", {"images": totals.images, "render_s": round(totals.render_s, 3)}, timeout_s=5)
        except LcmqError as exc:
            log.warning("worker row not marked stopped", extra={"error": str(exc)})

    def on_sigterm(self, *_args) -> None:
        log.info("SIGTERM: the edge worker stops after this micro-batch", extra={"grace_s": self.options.grace_s})
        self.shutdown.request(self.options.grace_s)
        threading.Thread(target=self._watchdog, name="lcmq-edge-grace", daemon=True).start()

    def _watchdog(self) -> None:
        """Past the grace period: hand back everything still held (the micro-batch that did not
        finish rendering, images not recorded) and exit, before the machine is taken away."""
        assert self.shutdown.deadline is not None
        time.sleep(max(0.0, self.shutdown.deadline - time.monotonic()))
        store = self.store
        if store is not None and (held := store.leases.held_by(self) + store.leases.held_by(store)):
            log.error("grace period over, handing back what is still held", extra={"jobs": len(held)})
            try:  # one short try: the machine is about to go, a gateway that is away gets the leases
                body = {"job_ids": held, "error": "worker stopping: grace period over"}
                self.client.call("/handback", body, timeout_s=5)
            except LcmqError as exc:
                log.error("jobs not handed back", extra={"jobs": len(held), "error": str(exc)})
        self._say_stopped()
        logging.shutdown()
        os._exit(0)

    # --- heartbeat -----------------------------------------------------------------------------

    def _beat(self) -> None:
        """The worker's row: counters every heartbeat_s; a row that is gone is written again by hello."""
        while not self._beats.wait(self.heartbeat_s):
            self._send_beat()

    def _send_beat(self) -> None:
        beat = current_beat(self.profile.name, self.settings)
        body = {
            "images": beat.images,
            "render_s": beat.render_s,
            "peak_memory_mb": beat.peak_memory_mb,
            "load_s": beat.load_s,
            "batch_size": beat.batch_size,
            "device": beat.device,
            "model_cache": beat.model_cache,
            "fetch_s": beat.fetch_s,
        }
        try:
            if not self.client.call("/heartbeat", body, timeout_s=10).get("ok", True):
                self.client.call("/hello", self._hello_body(), timeout_s=10)
        except LcmqError as exc:
            log.warning("edge heartbeat not written", extra={"error": str(exc)})


def run_edge_worker(profile: Profile, settings: Settings, options: EdgeOptions) -> None:
    """Run until SIGTERM (exit 0) or until the gateway refuses the token (an error)."""
    if not options.token:
        raise ConfigError("--token is empty: an edge worker needs its worker token (lcmq workertoken create)")
    if profile.family != NULL_FAMILY:
        check_device(settings.device)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    worker = EdgeWorker(profile, settings, options)
    signal.signal(signal.SIGTERM, worker.on_sigterm)
    try:
        worker.run()
    finally:
        worker.client.close()
