"""`lcmq worker --metrics-port N`: Prometheus text from the process that renders.

Every metric has the labels `profile` and `node` (the worker row's node, worker/presence.py).
With prefork and --concurrency C, pool child i (0..C-1, Celery's process index, kept by a child
that replaces a dead one) serves on port N+i; solo and threads serve on N. The server listens on
0.0.0.0 so that Prometheus can scrape it from another host.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lcmq.errors import ConfigError
from lcmq.settings import Settings
from worker.counters import COUNTERS
from worker.presence import current_beat

log = logging.getLogger("lcmq.worker")

METRICS_HOST = "0.0.0.0"  # noqa: S104 - scraped from the Prometheus host
# Seconds per micro-batch: a tiny model on a CPU renders in tens of milliseconds, SDXL batches
# of 8 on a small GPU take tens of seconds.
RENDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
LABELS = ("profile", "node")


def metrics_port_of(base: int, process_index: int | None) -> int:
    """Pool child i serves on base + i; a process without a pool index (solo, threads) on base."""
    return base + (process_index or 0)


def check_ports_free(base: int, processes: int) -> None:
    """At start, in the worker's parent: every port its processes will serve on can be bound.
    A port taken would otherwise show only as an error line in a pool child's log."""
    for port in range(base, base + processes):
        with socket.socket() as probe:
            try:
                probe.bind((METRICS_HOST, port))
            except OSError as exc:
                raise ConfigError(f"--metrics-port: port {port} cannot be used: {exc}") from exc


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


class ScrapeTimeValues(Collector):
    """What is read when Prometheus scrapes: the load's findings, peak memory, busy seconds."""

    def __init__(self, profile: str, node: str, settings: Settings):
        self.profile, self.settings = profile, settings
        self.labels = [profile, node]

    def collect(self) -> Iterator[Metric]:
        beat, totals = current_beat(self.profile, self.settings), COUNTERS.totals()
        peak_bytes = None if totals.peak_memory_mb is None else totals.peak_memory_mb * 2**20
        for name, text, value in (
            ("lcmq_worker_model_load_seconds", "Seconds the pipeline took to load (NaN while loading).", beat.load_s),
            (
                "lcmq_worker_batch_size",
                "Images per pipeline call, after any --max-memory probe (NaN while loading).",
                beat.batch_size,
            ),
            (
                "lcmq_worker_peak_memory_bytes",
                "The highest micro-batch peak of the process's memory, weights included.",
                peak_bytes,
            ),
        ):
            gauge = GaugeMetricFamily(name, text, labels=LABELS)
            gauge.add_metric(self.labels, _nan_if_none(value))
            yield gauge
        busy = CounterMetricFamily("lcmq_worker_busy_seconds", "Seconds spent inside render tasks.", labels=LABELS)
        busy.add_metric(self.labels, totals.busy_s)
        yield busy


def build_registry(profile: str, node: str, settings: Settings) -> CollectorRegistry:
    """This process's metrics: images and render seconds counted as micro-batches render
    (worker/counters.py), the rest read at scrape time."""
    registry = CollectorRegistry()
    images = Counter("lcmq_worker_images", "Images rendered by this process.", LABELS, registry=registry)
    render_s = Histogram(
        "lcmq_worker_render_seconds",
        "Seconds of one micro-batch's pipeline call.",
        LABELS,
        buckets=RENDER_BUCKETS,
        registry=registry,
    )
    images_child, render_child = images.labels(profile, node), render_s.labels(profile, node)

    def observe(count: int, seconds: float) -> None:
        images_child.inc(count)
        render_child.observe(seconds)

    COUNTERS.observers.append(observe)
    registry.register(ScrapeTimeValues(profile, node, settings))
    return registry


def serve_metrics(port: int, profile: str, node: str, settings: Settings) -> None:
    """Start the endpoint in a daemon thread; a port taken since the start's check is logged,
    and the worker renders on without metrics."""
    registry = build_registry(profile, node, settings)
    try:
        start_http_server(port, addr=METRICS_HOST, registry=registry)
    except OSError as exc:
        log.error("worker metrics not served", extra={"port": port, "node": node, "error": str(exc)})
        return
    log.info("worker metrics served", extra={"port": port, "node": node})
