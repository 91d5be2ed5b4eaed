"""Worker rows through the repository and the Python API: live, stale, stopped; the heartbeat
that rides out a database that is away; queue depth on the filesystem broker."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest

from bench.harness import free_port
from lcmq import api
from lcmq.repository import Repository, WorkerBeat, WorkerRecord, utcnow
from lcmq.settings import get_settings


def _record(node: str, *, started_ago_s: float, cost: float | None = 0.5, heartbeat_s: float = 10) -> WorkerRecord:
    started = utcnow() - timedelta(seconds=started_ago_s)
    return WorkerRecord(
        node=node,
        host="render-7",
        pid=4242,
        profile="tiny",
        device="auto",
        batch_size=4,
        peak_memory_mb=None,
        load_s=None,
        images=0,
        render_s=0.0,
        cost_per_hour=cost,
        heartbeat_s=heartbeat_s,
        started_at=started,
        last_seen_at=started,
        stopped_at=None,
    )


def _mine(node: str, include_stopped: bool = False) -> dict | None:
    return next((w for w in api.workers(include_stopped=include_stopped) if w["node"] == node), None)


def test_a_worker_row_is_live_then_stale_then_stopped(services_env):
    repo = api.repository()
    node = f"tiny-{uuid.uuid4().hex[:8]}@render-7#4242"
    repo.upsert_worker(_record(node, started_ago_s=100))
    beat = WorkerBeat(images=90, render_s=40.0, peak_memory_mb=812.5, load_s=3.2, batch_size=2, device="cuda")
    assert repo.heartbeat_worker(node, beat, now=utcnow() - timedelta(seconds=5))

    live = _mine(node)
    assert live is not None and live["state"] == "live"
    assert (live["device"], live["batch_size"], live["load_s"], live["peak_memory_mb"]) == ("cuda", 2, 3.2, 812.5)
    # 90 images from its start to its last heartbeat (95 s): the rate its cost pays for.
    assert live["images_per_s"] == pytest.approx(90 / 95, rel=1e-3)
    assert live["cost_per_1000_images"] == pytest.approx(0.5 / 3600 / (90 / 95) * 1000, rel=1e-3)

    # No heartbeat for more than 3 of its 10 s intervals.
    assert repo.heartbeat_worker(node, beat, now=utcnow() - timedelta(seconds=31))
    assert _mine(node)["state"] == "stale"

    assert repo.stop_worker(node, WorkerBeat(images=95, render_s=42.0))
    assert _mine(node) is None  # stopped ones only on request
    stopped = _mine(node, include_stopped=True)
    assert stopped["state"] == "stopped" and stopped["stopped_at"] and stopped["images"] == 95
    assert stopped["device"] == "cuda"  # a beat without a finding keeps the one written before

    assert not repo.heartbeat_worker(f"gone-{node}", beat)  # no row: the worker writes it again


def test_a_worker_without_a_cost_or_an_image_has_no_cost_per_image(services_env):
    repo = api.repository()
    node = f"tiny-{uuid.uuid4().hex[:8]}@render-7"
    repo.upsert_worker(_record(node, started_ago_s=10, cost=None))
    assert repo.heartbeat_worker(node, WorkerBeat(images=5, render_s=1.0))
    row = _mine(node)
    assert row["cost_per_hour"] is None and row["cost_per_1000_images"] is None and row["images_per_s"] > 0
    other = f"tiny-{uuid.uuid4().hex[:8]}@render-8"
    repo.upsert_worker(_record(other, started_ago_s=10))
    assert _mine(other)["cost_per_1000_images"] is None and _mine(other)["images_per_s"] is None


def test_the_heartbeat_rides_out_a_database_that_is_away_and_writes_its_row_again(services_env, caplog):
    from worker.presence import Presence

    settings = get_settings()
    node = f"tiny-{uuid.uuid4().hex[:8]}@render-9"
    away = Repository(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing")
    presence = Presence(away, _record(node, started_ago_s=1, heartbeat_s=0.1), settings)
    with caplog.at_level(logging.WARNING, logger="lcmq.worker"):
        presence.beat()
        presence.beat()  # never raises; logged once, not at every beat
    assert [r.message for r in caplog.records].count("worker heartbeat not written; trying again at the next beat") == 1
    assert _mine(node, include_stopped=True) is None

    presence.repo = api.repository()  # the database is back
    presence.beat()
    assert _mine(node)["state"] == "live"
    # The row is deleted behind its back: the next beats write it again.
    with presence.repo.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("DELETE FROM workers WHERE node = :node"), {"node": node})
    presence.beat()
    presence.beat()
    assert _mine(node)["state"] == "live"
    presence.stop()  # its thread never ran: the stop is written here
    assert _mine(node, include_stopped=True)["state"] == "stopped"


def test_queue_depth_counts_the_message_files_of_the_filesystem_broker(embedded_env):
    from lcmq.queue import queue_depths

    api.submit([f"a red fox {i}" for i in range(3)], model="null", chunk_size=1)
    assert queue_depths(["null", "tiny"]) == {"null": 3, "tiny": 0}
