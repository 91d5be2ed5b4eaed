"""Process-level worker state: the shutdown flag shared with pool children, and the fault hook
the fault suite uses to crash a worker on purpose. (Leases and their heartbeat: worker/leases.py.)"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal

log = logging.getLogger("lcmq.worker")

# Created before Celery forks its pool, so parent and children share this byte of memory: the
# parent sets it on SIGTERM and a child notices between micro-batches.
_SHUTDOWN = multiprocessing.RawValue("b", 0)


def request_shutdown() -> None:
    _SHUTDOWN.value = 1


def shutting_down() -> bool:
    return bool(_SHUTDOWN.value)


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
