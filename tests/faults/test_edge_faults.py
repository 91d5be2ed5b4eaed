"""Faults of edge workers, in real processes: an `lcmq api` as the gateway, `lcmq worker
--gateway` processes with nothing but a URL and a token. Each checks every job final, none lost,
no duplicate objects, manifest == objects == succeeded rows, attempts within their bound."""

from __future__ import annotations

import time

from support.api_server import ApiServer
from support.edge import edge_env, running_of, start_edge, when_rendering, worker_token

from bench.harness import done, free_port, outcome, wait_until, write_prompts
from lcmq import api

DRAIN_S = 120


def _gateway(procs, env: dict[str, str], port: int | None = None) -> ApiServer:
    """A real `lcmq api` on a loopback port (the same one again after a restart)."""
    import httpx

    port = port or free_port()
    process = procs(env, "api", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.alive(), process.log[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 60, interval_s=0.1, what=f"lcmq api on {url}")
    return ApiServer(process, url)


def _submit(path, count: int) -> str:
    return api.submit(write_prompts(path, count), model="tiny", width=128, height=128).batch_id


def _exactly_once(batch_id: str, attempts_bound: int):
    wait_until(lambda: done(batch_id), DRAIN_S, interval_s=0.2, what=f"batch {batch_id} to finish")
    wait_until(lambda: api.repository().get_batch(batch_id).manifest_at is not None, 30, what="the manifest")
    result = outcome(batch_id)
    assert (result.lost, result.duplicates, result.stuck, result.mismatched) == (0, 0, 0, 0), result.line()
    assert result.succeeded == result.total and result.max_attempts <= attempts_bound, result.line()
    return result


def test_kill_9_an_edge_worker_mid_micro_batch(fault_env, procs, tmp_path):
    gateway = _gateway(procs, fault_env)
    token = worker_token("spot")
    victim = start_edge(procs, edge_env(fault_env, tmp_path / "a"), gateway.url, token, "victim")
    survivor = start_edge(procs, edge_env(fault_env, tmp_path / "b"), gateway.url, token, "survivor")
    victim.wait_ready(), survivor.wait_ready()
    batch_id = _submit(tmp_path / "p.jsonl", 16)
    when_rendering(batch_id, "edge/spot/victim")
    victim.kill()
    held = running_of(batch_id, "edge/spot/victim")
    assert held  # its leases: the only thing a hard kill costs
    _exactly_once(batch_id, attempts_bound=2)
    rows = {j.id: j for j in api.repository().jobs(batch_id)}
    # the jobs it held came back after their lease (LCMQ_LEASE_S=3) and were redone by the other
    assert all(rows[i].attempts == 2 and rows[i].worker == "edge/spot/survivor" for i in held)


GATEWAY_DOWN_S = 30


def test_the_gateway_away_mid_batch(fault_env, procs, tmp_path):
    # Leases outlive the outage: the worker's records after it are accepted, no job is redone.
    env = fault_env | {"LCMQ_LEASE_S": "60"}
    first = _gateway(procs, env)
    token = worker_token("steady")
    edge = start_edge(procs, edge_env(fault_env, tmp_path / "box"), first.url, token, "box").wait_ready()
    batch_id = _submit(tmp_path / "p.jsonl", 16)
    when_rendering(batch_id, "edge/steady/box")
    first.process.kill()  # kill -9: no answer from that moment on
    port = int(first.url.rsplit(":", 1)[1])
    wait_until(lambda: "gateway unavailable" in edge.log or "backing off" in edge.log, 30, what="the worker to wait")
    time.sleep(GATEWAY_DOWN_S)  # the outage: the worker backs off meanwhile
    assert edge.alive() and not done(batch_id)
    _gateway(procs, env, port)
    _exactly_once(batch_id, attempts_bound=1)  # nothing lost, no job twice
    assert {j.worker for j in api.repository().jobs(batch_id)} == {"edge/steady/box"}


def test_sigterm_finishes_the_micro_batch_and_hands_the_rest_back_at_once(fault_env, procs, tmp_path):
    # A long lease: a job left to its lease would stay running for a minute.
    env = fault_env | {"LCMQ_LEASE_S": "60"}
    gateway = _gateway(procs, env)
    token = worker_token("preempted")
    stopping = start_edge(procs, edge_env(fault_env, tmp_path / "a"), gateway.url, token, "a", "--grace-s", "15")
    other = start_edge(procs, edge_env(fault_env, tmp_path / "b"), gateway.url, token, "b")
    stopping.wait_ready(), other.wait_ready()
    batch_id = _submit(tmp_path / "p.jsonl", 12)
    when_rendering(batch_id, "edge/preempted/a")
    held = set(running_of(batch_id, "edge/preempted/a"))  # in its hands: rendering, or next
    assert stopping.terminate() == 0
    # A clean stop leaves nothing running as it: what it rendered is recorded, the rest queued.
    assert running_of(batch_id, "edge/preempted/a") == []
    assert "edge worker stopped" in stopping.log
    _exactly_once(batch_id, attempts_bound=1)  # handed back and rendered by the other, not redone after a lease
    # What it held at SIGTERM was stored by it (the micro-batch it was rendering) or handed back
    # at once and rendered by the other: never left to its 60 s lease (attempts stay 1).
    rows = {j.id: j for j in api.repository().jobs(batch_id)}
    assert all(rows[i].state == "succeeded" and rows[i].attempts == 1 for i in held)
