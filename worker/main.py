"""`lcmq worker`: a Celery worker pinned to one model profile and its queue."""

from __future__ import annotations

import os
import socket

from lcmq.errors import ProfileError
from lcmq.logs import setup_logging
from lcmq.profiles import NULL_FAMILY, get_profile, preflight
from lcmq.settings import get_settings, reset_settings
from lcmq.workers import announce


def run_worker(
    profile_name: str,
    *,
    concurrency: int = 1,
    pool: str = "prefork",
    batch_size: int | None = None,
    device: str | None = None,
    name: str | None = None,
    max_memory_mb: int | None = None,
    cost_per_hour: float | None = None,
    metrics_port: int | None = None,
) -> None:
    # Settings given as flags travel as LCMQ_* variables, so pool children build the same ones.
    if batch_size is not None:
        os.environ["LCMQ_BATCH_SIZE"] = str(batch_size)
    if device is not None:
        os.environ["LCMQ_DEVICE"] = device
    if max_memory_mb is not None:
        os.environ["LCMQ_MAX_MEMORY_MB"] = str(max_memory_mb)
    reset_settings()
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)

    profile = get_profile(profile_name)
    # A missing path, a wrong family, a single file without its config, or float16 on an explicit
    # CPU device stop the start, not the first task. (`auto` is resolved in the pool child.)
    preflight(profile, settings.device if settings.device != "auto" else None)
    from celery.signals import (
        worker_process_init,
        worker_process_shutdown,
        worker_ready,
        worker_shutdown,
        worker_shutting_down,
    )

    from worker.startup import check_dependencies
    from worker.threads import register_command, renders_on_cpu

    # A worker that lacks its device, database, broker or storage stops here, before it consumes.
    check_dependencies(profile, settings)
    if profile.family != NULL_FAMILY and renders_on_cpu(settings.device):
        # Before the pool forks, so that every process of this host's CPU workers is counted
        # when each takes its share of the cores for torch (worker/threads.py).
        register_command(settings.models_path, concurrency if pool == "prefork" else 1, profile.name)
    if metrics_port is not None:  # each process that renders serves on a port of its own
        from worker.metrics import check_ports_free

        check_ports_free(metrics_port, concurrency if pool == "prefork" else 1)
    from worker.lifecycle import (
        block_sigterm_in_children,
        install_test_hooks,
        make_shutdown_dispatch_reentrant,
        request_shutdown,
        take_sigterm_in_a_thread,
    )
    from worker.pipeline import preload
    from worker.presence import report_this_process, stop_reporting
    from worker.store import drain_on_exit
    from worker.tasks import WORKER_PROFILE_ENV, app  # registers the task on the shared app

    install_test_hooks()

    # SIGTERM: the running chunk finishes its micro-batch and hands the rest back; images still
    # storing in the background are stored and recorded before the process exits (pool child:
    # worker_process_shutdown; solo/threads: worker_shutdown).
    make_shutdown_dispatch_reentrant()
    worker_shutting_down.connect(request_shutdown, weak=False)
    worker_process_shutdown.connect(drain_on_exit, weak=False)
    worker_shutdown.connect(drain_on_exit, weak=False)
    # After the drain: the row's last counters include what it stored.
    worker_process_shutdown.connect(stop_reporting, weak=False)
    worker_shutdown.connect(stop_reporting, weak=False)
    if pool == "prefork":
        block_sigterm_in_children()
        worker_process_init.connect(take_sigterm_in_a_thread, weak=False)
    # Load the pipeline while the worker waits for its first task: in each pool child, never
    # in the prefork parent (CUDA cannot be used in a child forked after the parent touched it).
    node = name or f"{profile.name}-{os.getpid()}@{socket.gethostname()}"

    def start_rendering_process(**_signal_kwargs) -> None:
        preload(profile, get_settings())
        report_this_process(
            get_settings(),
            node=node,
            profile=profile.name,
            pool_child=pool == "prefork",
            cost_per_hour=cost_per_hour,
            metrics_port=metrics_port,
        )

    (worker_ready if pool in ("solo", "threads") else worker_process_init).connect(start_rendering_process, weak=False)
    os.environ[WORKER_PROFILE_ENV] = profile.name
    announce(settings, node, profile.name)  # so that a `submit --wait` in another shell knows it is here
    app.worker_main(
        [
            "worker",
            "--queues",
            profile.queue,
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            node,
            "--loglevel",
            settings.log_level,
            "--without-gossip",
            "--without-mingle",
            "--prefetch-multiplier",
            "1",
            "-O",
            "fair",
        ]
    )


def run_edge(
    profile_name: str,
    *,
    gateway: str,
    token: str,
    grace_s: float = 20.0,
    batch_size: int | None = None,
    device: str | None = None,
    name: str | None = None,
) -> None:
    """`lcmq worker --gateway URL --token T`: an edge worker (worker/edge.py). It reads no
    database, broker or bucket setting and imports no Celery: the gateway is its only door."""
    if batch_size is not None:
        os.environ["LCMQ_BATCH_SIZE"] = str(batch_size)
    if device is not None:
        os.environ["LCMQ_DEVICE"] = device
    reset_settings()
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    profile = get_profile(profile_name)
    preflight(profile, settings.device if settings.device != "auto" else None)
    from worker.edge import EdgeOptions, run_edge_worker
    from worker.lifecycle import install_test_hooks
    from worker.threads import register_command, renders_on_cpu

    install_test_hooks()
    if profile.family != NULL_FAMILY and renders_on_cpu(settings.device):
        register_command(settings.models_path, 1, profile.name)  # one rendering process
    node = name or f"{profile.name}-{os.getpid()}@{socket.gethostname()}"
    run_edge_worker(profile, settings, EdgeOptions(gateway=gateway, token=token, node=node, grace_s=grace_s))


__all__ = ["run_worker", "run_edge", "ProfileError"]
