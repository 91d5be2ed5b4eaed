"""lcmq.costs: the formulas of `lcmq report`, and which worker row prices which jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lcmq.costs import batch_costs, cost_per_hour_of, job_worker_of, worker_costs
from lcmq.repository import WorkerJobSums, WorkerRecord
from worker.presence import process_node

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(node: str, pid: int, cost: float | None, started_s: float = 0.0) -> WorkerRecord:
    started = T0 + timedelta(seconds=started_s)
    return WorkerRecord(node, "h", pid, "tiny", "cpu", 2, None, 1.0, 0, 0.0, cost, 1.0, started, started, None)


def sums(worker: str, images: int, start_s: float, end_s: float, render_ms: float, failed: int = 0) -> WorkerJobSums:
    return WorkerJobSums(
        worker, images, failed, render_ms, T0 + timedelta(seconds=start_s), T0 + timedelta(seconds=end_s)
    )


def test_a_rows_job_worker_name_drops_only_its_own_pid(monkeypatch):
    monkeypatch.setattr("os.getpid", lambda: 815)
    child = process_node("tiny-812@gpu-3", pool_child=True)
    assert child == "tiny-812@gpu-3#815"  # how worker/presence.py names a prefork child's row
    assert job_worker_of(row(child, 815, None)) == "tiny-812@gpu-3"
    assert job_worker_of(row(process_node("tiny-812@gpu-3", pool_child=False), 815, None)) == "tiny-812@gpu-3"
    assert job_worker_of(row("edge/farm-a/box#1", 815, None)) == "edge/farm-a/box#1"  # another number: kept
    assert job_worker_of(row("edge/farm-a/box", 815, None)) == "edge/farm-a/box"


def test_the_row_running_at_the_last_image_prices_the_worker():
    rows = [
        row("n@h#10", 10, 1.0, started_s=0),
        row("n@h#11", 11, 3.0, started_s=100),  # a replacement child, restarted with another cost
        row("n@h#12", 12, 9.0, started_s=500),  # started after the batch's last image
        row("other@h", 13, 7.0),
        row("n@h#99", 14, 5.0),  # `#99` is not its pid: a worker named "n@h#99", not a child of n@h
    ]
    assert cost_per_hour_of("n@h", rows, T0 + timedelta(seconds=200)) == 3.0
    assert cost_per_hour_of("n@h", rows, T0 - timedelta(seconds=5)) == 1.0  # clocks apart: the first one
    assert cost_per_hour_of("n@h", [row("n@h#10", 10, None)], T0) is None
    assert cost_per_hour_of("gone@h", rows, T0) is None


def test_per_worker_and_batch_figures():
    rows = [row("cheap@h#5", 5, 0.36), row("dear@h", 6, 1.8), row("free@h", 7, None)]
    per_worker = worker_costs(
        [
            sums("cheap@h", images=30, start_s=0, end_s=100, render_ms=60_000, failed=1),
            sums("dear@h", images=50, start_s=10, end_s=110, render_ms=40_000),
            sums("free@h", images=20, start_s=20, end_s=60, render_ms=10_000),
            WorkerJobSums("failing@h", 0, 4, 0.0, None, None),  # only failures: nothing to price
        ],
        rows,
    )
    cheap, dear, free = (w.to_dict() for w in per_worker)
    # cheap: 0.36/h for 100 s = 0.01; dear: 1.8/h for 100 s = 0.05
    assert cheap["cost"] == pytest.approx(0.01) and dear["cost"] == pytest.approx(0.05)
    assert cheap["images_per_dollar"] == pytest.approx(3000) and dear["images_per_dollar"] == pytest.approx(1000)
    assert cheap["cost_per_1000_images"] == pytest.approx(0.01 / 30 * 1000)
    assert (cheap["busy_s"], cheap["gpu_busy_s"], cheap["images_per_s"], cheap["failed"]) == (100, 60, 0.3, 1)
    assert free["cost"] is None and free["images_per_dollar"] is None and free["images_per_s"] == 0.5

    batch = batch_costs(per_worker)
    assert (batch["images"], batch["wall_s"], batch["gpu_busy_s"]) == (100, 110, 110)
    assert batch["images_per_s"] == pytest.approx(100 / 110)
    assert batch["cost"] == pytest.approx(0.06) and batch["priced_images"] == 80
    assert batch["images_per_dollar"] == pytest.approx(80 / 0.06)
    assert batch["cost_per_1000_images"] == pytest.approx(0.06 / 80 * 1000)
    assert batch["unpriced_workers"] == ["free@h"]


def test_a_batch_without_images_or_costs_has_no_cost_figures():
    assert batch_costs([]) | {"unpriced_workers": None} == {
        "images": 0,
        "wall_s": None,
        "gpu_busy_s": 0,
        "images_per_s": None,
        "cost": None,
        "priced_images": 0,
        "cost_per_1000_images": None,
        "images_per_dollar": None,
        "unpriced_workers": None,
    }
    unpriced = batch_costs(worker_costs([sums("a@h", 3, 0, 0, 30.0)], []))  # one instant: no rate
    assert (unpriced["cost"], unpriced["images_per_s"], unpriced["unpriced_workers"]) == (None, None, ["a@h"])
