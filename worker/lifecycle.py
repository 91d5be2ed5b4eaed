"""Process-level worker state: the shutdown flag shared with pool children, lease heartbeats,
and the fault hook the fault suite uses to crash a worker on purpose."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("lcmq.worker")

# Created before Celery forks its pool, so parent and children share this byte of memory: the
# parent sets it on SIGTERM and a child notices between micro-batches.
_SHUTDOWN = multiprocessing.RawValue("b", 0)


def request_shutdown() -> None:
    _SHUTDOWN.value = 1


def shutting_down() -> bool:
    return bool(_SHUTDOWN.value)


class Heartbeat:
    """Renews the leases of the jobs a task holds every `interval_s`, in a daemon thread.

    A worker that dies stops renewing, so its jobs become claimable `lease_s` later.
    """

    def __init__(self, renew: Callable[[], None], interval_s: float):
        self._renew = renew
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lcmq-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - a missed renewal must not kill the render
                log.warning("lease renewal failed", extra={"error": str(exc)})

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- fault injection (tests/faults only) -------------------------------------------------
# Some faults cannot be caused from outside: a job that kills its worker every time it is
# rendered (a segfault, an OOM kill). With LCMQ_FAULT_KILL_PROMPT set, a worker SIGKILLs its
# own process when a micro-batch holds a prompt containing that text. Unset, this is a no-op.
FAULT_KILL_PROMPT_ENV = "LCMQ_FAULT_KILL_PROMPT"


def maybe_crash(prompts: list[str]) -> None:
    marker = os.environ.get(FAULT_KILL_PROMPT_ENV)
    if marker and any(marker in prompt for prompt in prompts):
        log.error("fault injection: killing this worker process", extra={"pid": os.getpid()})
        os.kill(os.getpid(), signal.SIGKILL)
