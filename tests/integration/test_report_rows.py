"""`lcmq report`'s two queries on Postgres (Repository.worker_job_sums, workers_named): jobs
recorded as workers record them, worker rows named as prefork children, solo and look-alikes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from lcmq import access, api
from lcmq.access import Principal
from lcmq.errors import NotFoundError
from lcmq.repository import StoredImage, WorkerRecord, utcnow


def row(node: str, pid: int, cost: float | None) -> WorkerRecord:
    started = utcnow() - timedelta(hours=1)
    return WorkerRecord(node, "h", pid, "null", "cpu", 2, None, 1.0, 0, 0.0, cost, 10.0, started, started, None)


def test_report_groups_jobs_by_worker_and_prices_them_by_their_rows(services_env):
    repo = api.repository()
    batch_id = api.submit([f"p{i}" for i in range(7)], model="null").batch_id
    tag = uuid.uuid4().hex[:6]
    child, solo, free = f"null-1%_{tag}@h", f"null-2@h-{tag}", f"edge/box-{tag}/n1"
    jobs = repo.jobs(batch_id)
    plan = {child: jobs[:3], solo: jobs[3:5], free: jobs[5:]}
    for worker, mine in plan.items():
        claimed = repo.claim([j.id for j in mine], worker, lease_s=60)
        images = [StoredImage(j.id, f"{batch_id}/{j.index}.png", "0" * 64, 250.0, 2, None) for j in claimed]
        if worker == solo:  # one of its two jobs fails
            repo.record_successes(images[:1], worker)
            repo.record_failure([images[1].job_id], worker, "RuntimeError: boom")
        else:
            repo.record_successes(images, worker)
    repo.upsert_worker(row(f"{child}#41", 41, 0.5))  # the prefork child of `child`
    repo.upsert_worker(row(f"null-1%_{tag}@hX#41", 41, 90.0))  # a look-alike: LIKE's % and _ are literal
    repo.upsert_worker(row(f"{child}#99", 42, 70.0))  # `#99` is not its pid: a worker named so
    repo.upsert_worker(row(solo, 43, 2.0))
    repo.upsert_worker(row(free, 44, None))

    sums = {s.worker: s for s in repo.worker_job_sums(batch_id)}
    assert {w: (s.images, s.failed, s.render_ms) for w, s in sums.items()} == {
        child: (3, 0, 750.0),
        solo: (1, 1, 250.0),
        free: (2, 0, 500.0),
    }
    assert {r.node for r in repo.workers_named([child])} == {f"{child}#41", f"{child}#99"}

    report = api.report(batch_id)
    per_worker = {w["worker"]: w for w in report["workers"]}
    assert per_worker[child]["cost_per_hour"] == 0.5 and per_worker[solo]["cost_per_hour"] == 2.0
    assert per_worker[free]["cost"] is None and report["unpriced_workers"] == [free]
    for name in (child, solo):
        w = per_worker[name]
        assert w["cost"] == pytest.approx(w["cost_per_hour"] * w["busy_s"] / 3600)
    assert (report["images"], report["failed"], report["priced_images"], report["done"]) == (6, 1, 4, True)
    assert report["gpu_busy_s"] == pytest.approx(1.5)
    assert report["cost"] == pytest.approx(per_worker[child]["cost"] + per_worker[solo]["cost"])

    stranger = access.create_key(repo, f"stranger-{tag}")
    with pytest.raises(NotFoundError):
        api.report(batch_id, principal=Principal(stranger.name, admin=False))
