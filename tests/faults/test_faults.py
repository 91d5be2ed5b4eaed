"""Each test injects one fault mid-batch into real processes, lets lcmq recover, and checks:
every job final, none lost, no duplicate objects, manifest == objects == succeeded rows,
attempts within their bound."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from sqlalchemy import create_engine, text
from support.fault_hooks import kill_on_prompt_env

from bench.harness import (
    VENV_BIN,
    FaultProxy,
    Process,
    done,
    outcome,
    running_jobs_of,
    wait_until,
    worker_node,
    write_prompts,
)
from lcmq import api
from lcmq.repository import normalize_url

DRAIN_S = 120


def _workers(procs, env, count: int = 2, *extra: str) -> list[Process]:
    workers = [procs(env, "worker", "--model", "tiny", *extra) for _ in range(count)]
    for worker in workers:
        worker.wait_ready()
    return workers


def _submit(path, **options) -> str:
    """Submit in this process (its environment is the test's); the CLI's own tests are elsewhere."""
    return api.submit(path, model="tiny", **options).batch_id


def _assert_exactly_once(batch_id: str, *, failed: int = 0, attempts_bound: int = 3):
    wait_until(lambda: done(batch_id), DRAIN_S, interval_s=0.2, what=f"batch {batch_id} to finish")
    result = outcome(batch_id)
    assert (result.lost, result.duplicates, result.stuck, result.mismatched) == (0, 0, 0, 0), result.line()
    assert result.failed == failed and result.succeeded == result.total - failed, result.line()
    assert result.max_attempts <= attempts_bound, result.line()
    return result


def _when_rendering(batch_id: str, worker: Process) -> None:
    """Once the farm is past start-up (a job of the batch done) and the worker holds jobs
    (rendering or storing them). Its own first record and its next claim can come within a few
    ms of each other now that images store in the background, too short a window to poll for."""
    node = worker_node(worker)

    def rendering() -> bool:
        jobs = api.repository().jobs(batch_id)
        return any(j.state == "succeeded" for j in jobs) and any(
            j.worker == node and j.state == "running" for j in jobs
        )

    wait_until(rendering, 60, interval_s=0.01, what=f"{node} to render")


def test_kill_9_a_worker_while_it_renders(fault_env, procs, tmp_path):
    victim, survivor = _workers(procs, fault_env)
    procs(fault_env, "sweep", "--every", "0.5s")
    batch_id = _submit(write_prompts(tmp_path / "p.jsonl", 24))
    _when_rendering(batch_id, victim)
    victim.kill()
    result = _assert_exactly_once(batch_id)
    rows = api.repository().jobs(batch_id)
    redone = [j for j in rows if j.attempts == 2]
    assert redone and all(j.worker == worker_node(survivor) for j in redone)
    assert result.max_attempts == 2


def test_sigterm_finishes_the_micro_batch_and_hands_the_rest_back(fault_env, procs, tmp_path):
    # Two workers; the single chunk goes to one of them, which is then stopped.
    workers = _workers(procs, fault_env, 2, "--batch-size", "1")
    # 128x128 images take long enough that the stop lands inside a chunk of 8.
    batch_id = _submit(write_prompts(tmp_path / "p.jsonl", 8), chunk_size=8, width=128, height=128)
    stopping = wait_until(
        lambda: next((w for w in workers if running_jobs_of(batch_id, worker_node(w))), None),
        60,
        interval_s=0.01,
        what="a worker to take the chunk",
    )
    _when_rendering(batch_id, stopping)
    assert stopping.terminate() == 0
    node = worker_node(stopping)
    # A clean stop leaves nothing running: what it did not render is queued again.
    assert running_jobs_of(batch_id, node) == 0
    assert "jobs handed back" in stopping.log
    _assert_exactly_once(batch_id, attempts_bound=1)  # the other worker renders what was handed back
    assert {j.worker for j in api.repository().jobs(batch_id)} == {worker_node(w) for w in workers}


def test_redis_restart_mid_batch(fault_env, procs, tmp_path, redis_server):
    worker, _ = _workers(procs, fault_env)
    procs(fault_env, "sweep", "--every", "0.5s")
    batch_id = _submit(write_prompts(tmp_path / "p.jsonl", 32))
    _when_rendering(batch_id, worker)
    redis_server.restart(down_s=2)
    _assert_exactly_once(batch_id)


def test_postgres_backends_terminated_mid_render(fault_env, procs, tmp_path):
    worker, _ = _workers(procs, fault_env)
    procs(fault_env, "sweep", "--every", "0.5s")
    batch_id = _submit(write_prompts(tmp_path / "p.jsonl", 24))
    _when_rendering(batch_id, worker)
    engine = create_engine(normalize_url(fault_env["LCMQ_DATABASE_URL"]), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        # Only this session's own database: every other backend on it belongs to this test.
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    engine.dispose()
    assert killed > 0
    _assert_exactly_once(batch_id)


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_s3_errors_and_timeouts_for_a_while(fault_env, procs, tmp_path, s3_endpoint, mode):
    proxy = FaultProxy(s3_endpoint)
    env = fault_env | {"LCMQ_S3_ENDPOINT_URL": proxy.url}
    worker, _ = _workers(procs, env)
    procs(env, "sweep", "--every", "0.5s")
    batch_id = _submit(write_prompts(tmp_path / "p.jsonl", 16))
    _when_rendering(batch_id, worker)
    proxy.mode = mode
    time.sleep(5)
    proxy.mode = "pass"
    try:
        _assert_exactly_once(batch_id)
        assert proxy.faults > 0
        # Settled as transient: handed back by the store pipeline (the task may have returned
        # before its uploads failed), or by the task's own retry.
        logs = worker.log + _.log
        assert "storing failed, jobs handed back" in logs or "transient failure, retrying" in logs
        assert "micro-batch failed" not in logs  # never failed for good
    finally:
        proxy.close()


def test_a_poison_job_fails_after_max_attempts(fault_env, procs, tmp_path):
    env = fault_env | kill_on_prompt_env("POISON")
    _workers(procs, env)
    procs(env, "sweep", "--every", "0.5s")
    batch_id = _submit(write_prompts(tmp_path / "p.jsonl", 12, poison_at={5}))
    result = _assert_exactly_once(batch_id, failed=1)
    (poison,) = [j for j in api.repository().jobs(batch_id) if j.state == "failed"]
    assert poison.index == 5 and poison.attempts == 3
    assert "worker lost during attempt 3 of 3" in poison.error
    assert result.succeeded == 11


def test_the_same_batch_submitted_twice_concurrently(fault_env, procs, tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", 12)
    lcmq = str(VENV_BIN / "lcmq")
    runs = [
        subprocess.Popen(
            [lcmq, "submit", str(path), "--model", "tiny", "--json"],
            env=fault_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    batch_ids = {json.loads(out.strip().splitlines()[-1])["batch_id"] for out, _ in outputs}
    assert len(batch_ids) == 1
    (batch_id,) = batch_ids
    assert sum(1 for b in api.batches(100) if b["batch_id"] == batch_id) == 1
    _workers(procs, fault_env, 1)
    result = _assert_exactly_once(batch_id, attempts_bound=1)
    assert result.total == 12
    # and a third submission, after the fact, renders nothing new
    assert _submit(path) == batch_id
    assert outcome(batch_id).succeeded == 12


def test_crash_between_commit_and_publish(fault_env, procs, tmp_path, redis_server):
    path = write_prompts(tmp_path / "p.jsonl", 12)
    redis_server.stop()  # the broker is gone when the submit publishes: the commit has happened
    lcmq = str(VENV_BIN / "lcmq")
    failed = subprocess.run(
        [lcmq, "submit", str(path), "--model", "tiny"], env=fault_env, capture_output=True, text=True, timeout=120
    )
    assert failed.returncode != 0
    assert "is saved, but its messages could not be published" in failed.stderr
    batch_id = re.search(r"batch (\w+) is saved", failed.stderr).group(1)
    assert api.status(batch_id).queued == 12
    assert api.repository().get_batch(batch_id).published_at is None
    redis_server.start()
    _workers(procs, fault_env, 1)
    procs(fault_env, "sweep", "--every", "0.5s")  # publishes what the submit could not
    _assert_exactly_once(batch_id, attempts_bound=1)
