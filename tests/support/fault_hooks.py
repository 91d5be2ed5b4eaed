"""Faults a worker cannot be made to have from outside, installed in a real `lcmq worker` by
LCMQ_TEST_HOOKS=tests.support.fault_hooks (worker/lifecycle.py). Never imported by the package.

A job that takes its worker down every time it is rendered (a segfault, an OOM kill): with
LCMQ_FAULT_KILL_PROMPT set, a worker process SIGKILLs itself when a micro-batch it is about to
render holds a prompt containing that text.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

HOOKS_MODULE = "tests.support.fault_hooks"
FAULT_KILL_PROMPT_ENV = "LCMQ_FAULT_KILL_PROMPT"
REPO_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger("lcmq.worker")


def kill_on_prompt_env(marker: str) -> dict[str, str]:
    """The environment a worker needs to crash on `marker` (the repo root on its path, so it can
    import this module)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"LCMQ_TEST_HOOKS": HOOKS_MODULE, FAULT_KILL_PROMPT_ENV: marker, "PYTHONPATH": path}


def install() -> None:
    """Wrap the render the render loop calls (in the worker, before its pool forks)."""
    from worker import batch_render

    batch_render.render = _crashing_on_marker(batch_render.render)


def _crashing_on_marker(render):
    marker = os.environ.get(FAULT_KILL_PROMPT_ENV, "")

    def render_or_crash(loaded, group, *inputs):  # init and control images, as render takes them
        if marker and any(marker in job.prompt for job in group):
            log.error("fault injection: killing this worker process", extra={"pid": os.getpid()})
            os.kill(os.getpid(), signal.SIGKILL)
        return render(loaded, group, *inputs)

    return render_or_crash
