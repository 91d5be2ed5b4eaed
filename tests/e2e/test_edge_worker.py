"""The acceptance of edge workers: a Celery worker (with the farm's credentials) and an edge
worker (with a gateway URL and a token, nothing else) render one batch together to moto S3,
through a real `lcmq api` as the gateway."""

from __future__ import annotations

from support.api_server import start_api
from support.edge import SECRET_PREFIXES, edge_env, start_edge, worker_token

from bench.harness import done, outcome, wait_until, worker_node, write_prompts
from lcmq import api


def test_a_celery_worker_and_an_edge_worker_render_one_batch(isolated_env, procs, cli, tmp_path):
    gateway = start_api(procs, isolated_env)
    token = worker_token("rented")
    env = edge_env(isolated_env, tmp_path / "rented-box")
    assert not any(key.startswith(SECRET_PREFIXES) for key in env)  # no database, broker or bucket
    # A token for another profile is refused at hello: exit 1, the reason, never the token.
    other = worker_token("other", profiles="sd15")
    refused = cli(env, "worker", "--model", "tiny", "--gateway", gateway.url, "--token", other, timeout_s=120)
    assert refused.returncode == 1 and "may not serve profile 'tiny'" in refused.stderr, refused.stderr[-2000:]
    assert other not in refused.stderr + refused.stdout
    edge = start_edge(procs, env, gateway.url, token, "box1")
    celery = procs(isolated_env, "worker", "--model", "tiny")
    edge.wait_ready(), celery.wait_ready()
    batch_id = api.submit(write_prompts(tmp_path / "p.jsonl", 24), model="tiny", width=128, height=128).batch_id

    wait_until(lambda: done(batch_id), 120, interval_s=0.2, what=f"batch {batch_id} to finish")
    wait_until(lambda: api.repository().get_batch(batch_id).manifest_at is not None, 30, what="the manifest")
    result = outcome(batch_id)  # rows, objects and manifest agree
    assert (result.lost, result.duplicates, result.stuck, result.mismatched) == (0, 0, 0, 0), result.line()
    assert result.succeeded == 24 and result.max_attempts == 1, result.line()  # every job exactly once
    by_worker = {j.worker for j in api.repository().jobs(batch_id)}
    assert by_worker == {"edge/rented/box1", worker_node(celery)}, by_worker
    # The edge process was given no secret, and made no local database of its own either.
    assert edge.alive() and not (tmp_path / "rented-box" / ".lcmq" / "lcmq.db").exists()
    assert token not in edge.log
