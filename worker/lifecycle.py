"""Process-level worker state: the shutdown flag shared with pool children, SIGTERM in those
children, and the hook through which the fault suite installs its faults. (Leases and their
heartbeat: worker/leases.py.)"""

from __future__ import annotations

import _thread
import importlib
import logging
import multiprocessing
import os
import signal
import threading

log = logging.getLogger("lcmq.worker")

# Created before Celery forks its pool, so parent and children share this byte of memory: the
# parent sets it on SIGTERM and a child notices between micro-batches.
_SHUTDOWN = multiprocessing.RawValue("b", 0)


def request_shutdown(**_signal_kwargs) -> None:
    """Also Celery's worker_shutting_down receiver in the parent."""
    _SHUTDOWN.value = 1


def shutting_down() -> bool:
    return bool(_SHUTDOWN.value)


# --- SIGTERM in pool children ---------------------------------------------------------------
# A SIGTERM sent to the whole process group (`timeout`, systemd's control-group stop, a
# terminal) reaches the prefork children too. billiard's handler makes a child exit at once,
# possibly while it holds the lock of the queue it shares with the parent: the parent's warm
# shutdown then waits on that lock forever and only SIGKILL ends it. So a child keeps SIGTERM
# blocked from the fork on, and one thread takes it instead: from anyone but the parent it means
# "the worker stops" (the shared flag: the running chunk hands the rest back after its
# micro-batch; the parent is told, and its warm shutdown ends the child in order). From the
# parent it is billiard's own (a hard time limit, the end of a cold shutdown) and gets
# billiard's handler, in the main thread, as before.


def block_sigterm_in_children() -> None:
    """In the prefork parent, before its pool forks."""
    os.register_at_fork(after_in_child=_block_sigterm)


def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def take_sigterm_in_a_thread(**_signal_kwargs) -> None:
    """In a pool child, at Celery's worker_process_init; a SIGTERM held since the fork arrives now.
    Threads inherit the blocked signal, so none but this one ever sees it."""
    threading.Thread(target=_take_sigterms, name="lcmq-sigterm", daemon=True).start()


def _take_sigterms() -> None:
    parent = os.getppid()
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent:
            _thread.interrupt_main(signal.SIGTERM)
            continue
        log.info("SIGTERM: the worker stops after this micro-batch", extra={"pid": os.getpid(), "sender": sender})
        request_shutdown()
        # A second SIGTERM to a stopping parent changes nothing (make_shutdown_dispatch_reentrant).
        os.kill(parent, signal.SIGTERM)


# --- SIGTERM in the prefork parent ---------------------------------------------------------
# Celery's warm-shutdown handler runs `worker_shutting_down.send(...)`, and the signal's dispatch
# takes a plain `threading.Lock` while it lists the receivers. A second SIGTERM that lands in that
# window runs the handler again, nested in the same thread, which then waits on the lock its own
# outer call holds: the worker hangs until SIGKILL. Two SIGTERMs close together are the normal
# case, not a corner: systemd's control-group stop, `kill 0` or a test's killpg reach parent and
# child at once, and the child forwards its own to the parent (above). A re-entrant lock lets the
# nested call through; it only re-sets the stop flag the outer call sets.


def make_shutdown_dispatch_reentrant() -> None:
    """In the prefork parent, before Celery installs its SIGTERM handler."""
    from celery.signals import worker_shutting_down

    worker_shutting_down.lock = threading.RLock()


# --- test hooks (tests/faults only) -------------------------------------------------------
# Some faults cannot be caused from outside: a job that kills its worker every time it is
# rendered (a segfault, an OOM kill). The fault suite names a module of its own in
# LCMQ_TEST_HOOKS; the worker imports it and calls its install() at start, before the pool
# forks. Unset, nothing is imported and no task path knows about faults.
TEST_HOOKS_ENV = "LCMQ_TEST_HOOKS"


def install_test_hooks() -> None:
    if module_name := os.environ.get(TEST_HOOKS_ENV):
        importlib.import_module(module_name).install()
        log.warning("test hooks installed", extra={"hooks": module_name})
