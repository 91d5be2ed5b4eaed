"""`lcmq report` on a batch rendered by two real workers with different --cost-per-hour: a
prefork worker (its row is `<node>#<pid>`) and a solo one (its row is the node). The expected
figures are computed here from the jobs and workers rows, then compared with the CLI's JSON,
GET /v1/batches/{id}/report and the dashboard's cost panel."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from bench.harness import wait_until, worker_node
from lcmq import access, api
from lcmq.cli import main
from lcmq.http.auth import SESSION_COOKIE

COSTS = {"prefork": 0.5, "solo": 2.0}


def expected_from_rows(database_url: str, batch_id: str) -> dict[str, dict]:
    """Per jobs.worker: images, busy span, cost and images per dollar, straight from the tables."""
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        jobs = conn.execute(
            text("SELECT worker, started_at, finished_at FROM jobs WHERE batch_id = :b AND state = 'succeeded'"),
            {"b": batch_id},
        ).all()
        rows = conn.execute(text("SELECT node, pid, cost_per_hour FROM workers")).all()
    engine.dispose()
    expected: dict[str, dict] = {}
    for name in {job.worker for job in jobs}:
        mine = [job for job in jobs if job.worker == name]
        span = (max(j.finished_at for j in mine) - min(j.started_at for j in mine)).total_seconds()
        # A prefork child's row is `<node>#<its pid>`; a solo worker's is the node.
        costs = {r.cost_per_hour for r in rows if r.node in (name, f"{name}#{r.pid}")}
        assert len(costs) == 1, (name, costs)
        cost = costs.pop() * span / 3600
        expected[name] = {"images": len(mine), "busy_s": span, "cost": cost, "images_per_dollar": len(mine) / cost}
    return expected


def test_report_prices_each_worker_and_the_batch_from_the_rows(services_env, procs, cli, capsys):
    env = services_env | {"LCMQ_HEARTBEAT_S": "0.5"}
    workers = {
        pool: procs(env, "worker", "--model", "tiny", "--pool", pool, "--cost-per-hour", str(cost))
        for pool, cost in COSTS.items()
    }
    for worker in workers.values():
        worker.wait_ready()
    nodes = {pool: worker_node(worker) for pool, worker in workers.items()}

    def loaded() -> bool:  # both pipelines loaded: neither worker drains the queue alone
        rows = {w["node"]: w for w in api.workers()}
        prefork = [w for n, w in rows.items() if n.startswith(nodes["prefork"] + "#")]
        solo = rows.get(nodes["solo"])
        return bool(prefork and solo and prefork[0]["load_s"] and solo["load_s"])

    wait_until(loaded, 120, interval_s=0.2, what="both workers' rows with their load time")
    batch = api.submit([f"a lighthouse at dusk {i}" for i in range(12)], model="tiny", chunk_size=1)
    assert api.wait(batch.batch_id, timeout_s=120).succeeded == 12

    expected = expected_from_rows(env["LCMQ_DATABASE_URL"], batch.batch_id)
    assert set(expected) == set(nodes.values()), f"both workers must have rendered: {expected}"

    shown = cli(env, "report", batch.batch_id, "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    per_worker = {w["worker"]: w for w in report["workers"]}
    for pool, node in nodes.items():
        got, want = per_worker[node], expected[node]
        assert got["cost_per_hour"] == COSTS[pool]
        assert got["images"] == want["images"]
        assert got["busy_s"] == pytest.approx(want["busy_s"], abs=1e-6)
        assert got["cost"] == pytest.approx(want["cost"], rel=1e-6)
        assert got["images_per_dollar"] == pytest.approx(want["images_per_dollar"], rel=1e-6)
        assert got["cost_per_1000_images"] == pytest.approx(want["cost"] / want["images"] * 1000, rel=1e-6)
        assert got["gpu_busy_s"] > 0
    total_cost = sum(w["cost"] for w in expected.values())
    assert (report["images"], report["priced_images"], report["unpriced_workers"]) == (12, 12, [])
    assert report["cost"] == pytest.approx(total_cost, rel=1e-6)
    assert report["images_per_dollar"] == pytest.approx(12 / total_cost, rel=1e-6)
    assert report["done"] is True and report["wall_s"] >= max(w["busy_s"] for w in expected.values()) - 1e-6

    assert main(["report", batch.batch_id]) == 0  # the text form, in this process
    assert "images per dollar" in capsys.readouterr().out

    from lcmq.http.app import create_app

    stranger = access.create_key(api.repository(), f"stranger-{batch.batch_id}").key
    key = access.create_key(api.repository(), f"admin-{batch.batch_id}", admin=True).key
    with TestClient(create_app(run_background=False)) as client:
        path = f"/v1/batches/{batch.batch_id}/report"
        assert client.get(path, headers={"Authorization": f"Bearer {stranger}"}).status_code == 404  # the CLI's batch
        over_http = client.get(path, headers={"Authorization": f"Bearer {key}"})
        assert over_http.status_code == 200, over_http.text
        assert over_http.json()["images_per_dollar"] == pytest.approx(report["images_per_dollar"], rel=1e-9)
        client.cookies.set(SESSION_COOKIE, key)
        page = client.get(f"/batches/{batch.batch_id}").text
        assert 'id="cost"' in page and nodes["solo"] in page and nodes["prefork"] in page
        assert f'data-figure="images_per_dollar">{report["images_per_dollar"]:.1f}<' in page
