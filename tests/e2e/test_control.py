"""Control of running batches with real workers: cancel, resume, retry, priority; what the
records tell (truncated prompts) and what logs never tell (secrets)."""

from __future__ import annotations

import json
import uuid

from bench.harness import RedisServer, done, outcome, wait_until, worker_node, write_prompts
from lcmq import api

DRAIN_S = 120


def _lcmq(cli, env, *args) -> dict:
    result = cli(env, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _drain(batch_id: str) -> None:
    wait_until(lambda: done(batch_id), DRAIN_S, interval_s=0.2, what=f"batch {batch_id}")


def _clean(batch_id: str):
    result = outcome(batch_id)
    assert (result.lost, result.duplicates, result.stuck, result.mismatched) == (0, 0, 0, 0), result.line()
    return result


def test_cancel_stops_queued_and_running_jobs_and_resume_finishes_them(isolated_env, procs, cli, tmp_path):
    env = isolated_env
    # Two chunks of 12 single-image micro-batches, big enough (128x128) that the running chunk
    # is still rendering when the cancel (a CLI process) lands.
    batch_id = api.submit(
        write_prompts(tmp_path / "p.jsonl", 24), model="tiny", chunk_size=12, width=128, height=128
    ).batch_id
    worker = procs(env, "worker", "--model", "tiny", "--batch-size", "1").wait_ready()
    node = worker_node(worker)

    def mid_chunk() -> bool:
        jobs = api.repository().jobs(batch_id)
        return any(j.state == "succeeded" for j in jobs) and any(j.state == "running" for j in jobs)

    wait_until(mid_chunk, 60, interval_s=0.01, what=f"{node} mid-chunk")

    canceled = _lcmq(cli, env, "cancel", batch_id)
    assert canceled["canceled"] >= 12  # the queued chunk, at once
    _drain(batch_id)
    after = _clean(batch_id)
    assert after.failed == 0 and after.succeeded + after.canceled == 24
    assert 12 < after.canceled < 24, after.line()  # the running chunk stopped at a micro-batch

    resumed = _lcmq(cli, env, "resume", batch_id)
    assert resumed["queued"] + resumed["running"] + resumed["succeeded"] == 24
    _drain(batch_id)
    assert _clean(batch_id).succeeded == 24


def test_retry_failed_gives_failed_jobs_new_attempts(isolated_env, procs, cli, tmp_path):
    import boto3

    # A bucket that does not exist yet: every upload is refused for good (404), so each job
    # fails at once with the reason stored, not retried.
    bucket = f"later-{uuid.uuid4().hex[:8]}"
    env = isolated_env | {"LCMQ_STORAGE_URL": f"s3://{bucket}/x"}
    procs(env, "worker", "--model", "tiny").wait_ready()
    batch_id = api.submit(write_prompts(tmp_path / "p.jsonl", 6), model="tiny").batch_id
    _drain(batch_id)
    failed = api.repository().jobs(batch_id)
    assert [j.state for j in failed] == ["failed"] * 6
    assert all("NoSuchBucket" in j.error and j.attempts == 1 for j in failed)
    # `lcmq jobs` says what happened to each job: the table, and one JSON object per job.
    table = cli(env, "jobs", batch_id, "--state", "failed")
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 6 and all("NoSuchBucket" in line for line in table.stdout.splitlines())

    boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
    retried = _lcmq(cli, env, "retry", batch_id, "--failed")
    assert retried["failed"] == 0
    _drain(batch_id)
    jobs = api.repository().jobs(batch_id)
    assert [j.state for j in jobs] == ["succeeded"] * 6
    assert all(j.attempts == 1 and j.error is None for j in jobs)
    listed = [json.loads(line) for line in cli(env, "jobs", batch_id, "--json").stdout.splitlines()]
    assert [(j["index"], j["state"], j["error"]) for j in listed] == [(i, "succeeded", None) for i in range(6)]
    assert all(j["url"] == f"s3://{bucket}/x/{batch_id}/{j['index']:06d}.png" for j in listed)
    assert cli(env, "jobs", "nosuchbatch").returncode == 3  # not found


def test_urgent_batches_are_served_first(isolated_env, procs, tmp_path):
    routine = api.submit(write_prompts(tmp_path / "a.jsonl", 12), model="tiny", priority=0).batch_id
    urgent = api.submit([f"urgent {i}" for i in range(4)], model="tiny", priority=9).batch_id
    procs(isolated_env, "worker", "--model", "tiny").wait_ready()
    _drain(routine)
    _drain(urgent)
    jobs = api.repository()
    last_urgent = max(j.finished_at for j in jobs.jobs(urgent))
    first_routine = min(j.finished_at for j in jobs.jobs(routine))
    assert last_urgent < first_routine


def test_long_prompts_are_truncated_with_a_recorded_warning(isolated_env, procs):
    procs(isolated_env, "worker", "--model", "tiny").wait_ready()
    long_prompt = "a very detailed prompt " * 10  # 230 bytes: far past the 77-token encoder
    batch_id = api.submit([long_prompt, "short"], model="tiny").batch_id
    _drain(batch_id)
    records = {m["index"]: m for m in api.manifest(batch_id)}
    assert records[0]["warning"].startswith("prompt truncated to 77 tokens")
    assert records[1]["warning"] is None


def test_secrets_never_reach_logs_or_output(isolated_env, procs, cli, tmp_path):
    secret_redis, secret_pg, secret_aws = "redis-pw-7f3a", "pg-pw-91bc", "aws-secret-c4d2"
    redis = RedisServer(tmp_path / "auth-redis", password=secret_redis).start()
    try:
        # Postgres here trusts local users, so the password is carried but not checked.
        pg_url = isolated_env["LCMQ_DATABASE_URL"].replace("postgres@", f"postgres:{secret_pg}@")
        env = isolated_env | {
            "LCMQ_BROKER_URL": redis.url,
            "LCMQ_DATABASE_URL": pg_url,
            "AWS_SECRET_ACCESS_KEY": secret_aws,
            "LCMQ_LOG_LEVEL": "DEBUG",
        }
        worker = procs(env, "worker", "--model", "tiny").wait_ready()
        prompts = write_prompts(tmp_path / "p.jsonl", 3)
        submitted = cli(env, "submit", str(prompts), "--model", "tiny", "--wait", "--json")
        assert submitted.returncode == 0, submitted.stderr
        bad = cli(
            env | {"LCMQ_DATABASE_URL": pg_url.replace("127.0.0.1:5432", "127.0.0.1:9")}, "status", "nope"
        )  # a connection error message names the URL
        assert bad.returncode != 0
        worker.terminate()
        texts = [worker.log, submitted.stdout, submitted.stderr, bad.stderr, bad.stdout]
        for secret in (secret_redis, secret_pg, secret_aws):
            assert not any(secret in text for text in texts), secret
        assert "Connected to redis://:**@" in worker.log
    finally:
        redis.stop()
