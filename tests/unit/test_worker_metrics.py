"""The pieces of worker rows and metrics that need no services: the counters under threads,
the port each process serves on, the start's port check, the flags' own checks."""

from __future__ import annotations

import socket
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lcmq.cli import build_parser
from lcmq.errors import ConfigError
from lcmq.settings import Settings
from worker.counters import RenderCounters
from worker.metrics import check_ports_free, metrics_port_of


def test_counters_add_up_across_threads():
    counters = RenderCounters()
    seen: list[int] = []
    counters.observers.append(lambda images, seconds: seen.append(images))

    def render() -> None:
        for _ in range(1000):
            counters.rendered(2, 0.01, 100.0)
            counters.busy(0.02)

    threads = [threading.Thread(target=render) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals = counters.totals()
    assert totals.images == 16000 and sum(seen) == 16000
    assert totals.render_s == pytest.approx(80.0) and totals.busy_s == pytest.approx(160.0)
    assert totals.peak_memory_mb == 100.0


def test_pool_process_i_serves_on_port_n_plus_i():
    assert metrics_port_of(9200, None) == 9200  # solo, threads: the worker's own process
    assert [metrics_port_of(9200, i) for i in range(3)] == [9200, 9201, 9202]


def test_a_taken_metrics_port_stops_the_start_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics-port: port {port}"):
            check_ports_free(port - 1, 2)  # the second process's port is the taken one


def test_the_worker_registry_reads_its_gauges_at_scrape_time(monkeypatch):
    import worker.metrics

    counters = RenderCounters()
    monkeypatch.setattr(worker.metrics, "COUNTERS", counters)
    registry = worker.metrics.build_registry("tiny", "tiny-1@h#2", Settings())
    counters.rendered(3, 0.5, 64.0)
    counters.busy(0.75)
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if "_created" not in sample.name
    }
    assert samples["lcmq_worker_peak_memory_bytes"] == 64 * 2**20
    assert samples["lcmq_worker_busy_seconds_total"] == 0.75
    assert samples["lcmq_worker_model_load_seconds"] != samples["lcmq_worker_model_load_seconds"]  # NaN: not loaded


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--cost-per-hour", "-1"), ("--cost-per-hour", "nan"), ("--cost-per-hour", "cheap"), ("--metrics-port", "0")],
)
def test_worker_flags_refuse_bad_values_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["worker", "--model", "tiny", flag, value])
    assert exited.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_worker_flags_accept_a_cost_and_a_port():
    args = build_parser().parse_args(["worker", "--model", "tiny", "--cost-per-hour", "0.34", "--metrics-port", "9200"])
    assert (args.cost_per_hour, args.metrics_port) == (0.34, 9200)
