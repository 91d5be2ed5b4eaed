"""The prefork parent's warm shutdown survives a second SIGTERM that lands inside it."""

from __future__ import annotations

import threading

from celery.signals import worker_shutting_down

from worker.lifecycle import make_shutdown_dispatch_reentrant


def test_a_sigterm_inside_the_shutdown_dispatch_runs_instead_of_waiting_on_its_own_lock():
    # Celery's handler sends worker_shutting_down, whose dispatch holds the signal's lock while it
    # lists the receivers; a second SIGTERM there runs the handler again in the same thread. The
    # outer `with lock` below stands for that moment, the inner send for the nested handler.
    make_shutdown_dispatch_reentrant()
    received: list[str] = []

    def receiver(sender: str, **_kwargs) -> None:
        received.append(sender)

    worker_shutting_down.connect(receiver, weak=False)
    finished = threading.Event()

    def nested_handler() -> None:
        with worker_shutting_down.lock:
            worker_shutting_down.send(sender="second SIGTERM")
        finished.set()

    try:
        threading.Thread(target=nested_handler, daemon=True).start()
        assert finished.wait(5), "the nested dispatch waited on the lock its own outer call holds"
        assert received == ["second SIGTERM"]
    finally:
        if finished.is_set():  # else the stuck thread holds the lock, and disconnect would wait too
            worker_shutting_down.disconnect(receiver)
