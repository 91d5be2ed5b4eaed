"""A real worker with --metrics-port and --cost-per-hour, a real `lcmq api`: the worker's row,
both Prometheus endpoints parsed with prometheus_client's parser, and the row marked stopped
after SIGTERM. Queue depth is read with no worker running, over two priorities (two Redis lists)."""

from __future__ import annotations

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import free_port, wait_until, worker_node
from lcmq import access, api
from tests.support.api_server import start_api


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def tiny(**labels: str) -> tuple:
    return tuple(sorted({"profile": "tiny", **labels}.items()))


def test_worker_row_and_metrics_from_queue_to_stop(isolated_env, procs, cli):
    env = isolated_env | {"LCMQ_HEARTBEAT_S": "0.5", "LCMQ_METRICS_FINAL_COUNTS_S": "0"}
    low = api.submit([f"a red fox {i}" for i in range(3)], model="tiny", chunk_size=1, priority=0)
    high = api.submit([f"a blue owl {i}" for i in range(2)], model="tiny", chunk_size=1, priority=7)
    broker = redis.Redis.from_url(env["LCMQ_BROKER_URL"])
    lists = [key for key in broker.keys("render.tiny*") if broker.type(key) == b"list"]
    assert len(lists) == 2  # the bare list and a priority list: the depth must sum both

    server = start_api(procs, env)
    queued = scrape(f"{server.url}/metrics")
    assert queued[("lcmq_queue_depth", tiny())] == 5
    assert queued[("lcmq_jobs", tiny(state="queued"))] == 5
    assert queued[("lcmq_queue_oldest_seconds", tiny())] >= 0
    assert queued[("lcmq_workers_live", tiny())] == 0
    assert all(value == 1 for (name, _), value in queued.items() if name == "lcmq_metrics_part_up")

    port = free_port()
    worker = procs(env, "worker", "--model", "tiny", "--metrics-port", str(port), "--cost-per-hour", "0.5")
    worker.wait_ready()
    for batch in (low, high):
        assert api.wait(batch.batch_id, timeout_s=120).succeeded == batch.total

    def my_row() -> dict | None:
        rows = [w for w in api.workers() if w["node"].startswith(worker_node(worker) + "#")]
        return rows[0] if rows and rows[0]["images"] == 5 else None  # the heartbeat after the last image

    row = wait_until(my_row, 20, interval_s=0.2, what="the worker's row with 5 images")
    expected = {"state": "live", "profile": "tiny", "device": "cpu", "batch_size": 2, "cost_per_hour": 0.5}
    assert {name: row[name] for name in expected} == expected
    assert row["load_s"] > 0 and row["render_s"] > 0 and row["images_per_s"] > 0
    assert row["cost_per_1000_images"] == pytest.approx(0.5 / 3600 / row["images_per_s"] * 1000, rel=1e-3)

    node = {"node": row["node"]}
    own = scrape(f"http://127.0.0.1:{port}/metrics")
    assert own[("lcmq_worker_images_total", tiny(**node))] == 5
    assert own[("lcmq_worker_render_seconds_count", tiny(**node))] == 5  # a micro-batch per chunk of 1
    assert own[("lcmq_worker_render_seconds_sum", tiny(**node))] > 0
    assert own[("lcmq_worker_batch_size", tiny(**node))] == 2
    assert own[("lcmq_worker_model_load_seconds", tiny(**node))] > 0
    assert own[("lcmq_worker_peak_memory_bytes", tiny(**node))] > 0
    assert own[("lcmq_worker_busy_seconds_total", tiny(**node))] > 0

    done = scrape(f"{server.url}/metrics")
    assert done[("lcmq_jobs", tiny(state="succeeded"))] == 5
    assert done[("lcmq_jobs", tiny(state="queued"))] == 0
    assert done[("lcmq_queue_depth", tiny())] == 0
    assert done[("lcmq_workers_live", tiny())] == 1

    key = access.create_key(api.repository(), "farm-viewer").key
    assert httpx.get(f"{server.url}/v1/workers").status_code == 401
    listed = httpx.get(f"{server.url}/v1/workers", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert row["node"] in {w["node"] for w in listed}

    assert worker.terminate() == 0  # SIGTERM: a warm shutdown marks the row stopped
    stopped = cli(env, "workers", "--json", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert '"state": "stopped"' in stopped.stdout and row["node"] in stopped.stdout
    assert row["node"] not in cli(env, "workers", "--json").stdout
