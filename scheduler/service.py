"""`lcmq scheduler`: the long-running producer service. Every tick it fires the schedules that
are due; every `sweep_every_s` it runs the sweeper; beside them a thread sends webhooks
(scheduler/webhooks.py). Any number may run: a schedule fires once (see scheduler/schedules.py),
the sweeper is safe to run twice, and a webhook delivery is claimed by one sender at a time.
"""

from __future__ import annotations

import logging
import threading
import time

from lcmq.errors import LcmqError
from lcmq.repository import Repository
from lcmq.settings import Settings
from lcmq.storage import Storage
from scheduler.schedules import fire_due
from scheduler.sweeper import sweep_once
from scheduler.webhooks import DeliveryLoop

log = logging.getLogger("lcmq.scheduler")


def _guarded(what: str, action) -> None:
    """The service outlives a failed step: it is logged and tried again at the next turn."""
    try:
        action()
    except LcmqError as exc:
        log.error(f"{what} failed", extra={"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - the process that fires schedules must not die of one
        log.exception(f"{what} failed unexpectedly", extra={"error": f"{type(exc).__name__}: {exc}"})


def run_scheduler(repo: Repository, storage: Storage, settings: Settings, stop: threading.Event) -> None:
    """Tick until `stop` is set (SIGTERM/SIGINT); a tick in progress finishes first."""
    log.info("scheduler ready.", extra={"tick_s": settings.scheduler_tick_s, "sweep_every_s": settings.sweep_every_s})
    next_sweep = time.monotonic()
    webhooks = DeliveryLoop(settings, repo).start()  # a farm without an API process still delivers
    try:
        while not stop.is_set():
            _guarded("firing schedules", lambda: fire_due(repo, storage, settings))
            if time.monotonic() >= next_sweep:
                _guarded("sweep", lambda: sweep_once(repo, settings))
                next_sweep = time.monotonic() + settings.sweep_every_s
            stop.wait(settings.scheduler_tick_s)
    finally:
        webhooks.stop()
    log.info("scheduler stopped")
