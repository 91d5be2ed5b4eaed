"""The fault suite's world: a private Redis (append-only file on, restartable), the session's
Postgres database and moto S3 server, short leases, a sweeper, and `lcmq worker` processes."""

from __future__ import annotations

import uuid

import pytest

from bench.harness import Process, RedisServer

FAULT_SETTINGS = {
    "LCMQ_LEASE_S": "3",  # a dead worker's jobs come back after 3 s
    "LCMQ_DISPATCH_GRACE_S": "2",
    "LCMQ_REDISPATCH_S": "4",
    "LCMQ_MAX_ATTEMPTS": "3",
    "LCMQ_S3_TIMEOUT_S": "2",
    "LCMQ_S3_MAX_ATTEMPTS": "2",
    "LCMQ_CHUNK_SIZE": "4",
    "LCMQ_BATCH_SIZE": "2",
    "LCMQ_VISIBILITY_TIMEOUT_S": "3600",
}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def fault_env(services_env, redis_server, own_pg_url, monkeypatch):
    """services_env with its own Redis and database and fault-suite timings; the test process
    uses it too. A database per test: a sweeper sees every batch in its database."""
    env = dict(services_env) | FAULT_SETTINGS | {"LCMQ_BROKER_URL": redis_server.url,
                                                 "LCMQ_DATABASE_URL": own_pg_url,
                                                 "LCMQ_STORAGE_URL": f"s3://lcmq-test/f-{uuid.uuid4().hex[:8]}"}
    for key, value in env.items():
        if key.startswith("LCMQ_"):
            monkeypatch.setenv(key, value)
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    reset_settings()
    get_app.cache_clear()
    return env


@pytest.fixture
def procs(tmp_path):
    """Start lcmq processes (workers, sweeper, submit) that are all stopped at the end."""
    started: list[Process] = []

    def start(env: dict[str, str], *args: str) -> Process:
        process = Process(env, tmp_path / f"proc-{len(started)}-{args[0]}.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
