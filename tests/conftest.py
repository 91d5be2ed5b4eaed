"""Shared fixtures: real Postgres, Redis and moto's S3 server; embedded settings; workers.

Postgres and Redis are the machine's own services. Each test session gets its own database
and its own Redis database number, so sessions running side by side never see each other.
Without the services a test is skipped on a laptop and fails under CI=true.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from bench.harness import VENV_BIN, MotoS3, Process, RedisServer, create_database

PG_ADMIN_URL = os.environ.get("LCMQ_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("LCMQ_TEST_REDIS_PORT", "6379"))
BUCKET = "lcmq-test"
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_missing(what: str, exc: Exception):
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


# --- services ---------------------------------------------------------------------------


def _create_database():
    try:
        return create_database(PG_ADMIN_URL)
    except Exception as exc:  # noqa: BLE001 - any driver error means the service is missing
        service_missing("PostgreSQL at 127.0.0.1:5432", exc)


@pytest.fixture(scope="session")
def pg_url():
    """A fresh Postgres database for this session."""
    url, drop = _create_database()
    yield url
    drop()


@pytest.fixture
def own_pg_url():
    """A fresh, migrated Postgres database for one test (tests whose sweeper must see only them)."""
    from lcmq.migrate import upgrade

    url, drop = _create_database()
    upgrade(url)
    yield url
    drop()


@pytest.fixture(scope="session")
def migrated_pg_url(pg_url):
    from lcmq.migrate import upgrade

    upgrade(pg_url)
    return pg_url


@pytest.fixture(scope="session")
def redis_db():
    """A Redis database number (1-15) held for this session through a lock key in db 0."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        service_missing(f"Redis at {REDIS_HOST}:{REDIS_PORT}", exc)
    token = uuid.uuid4().hex
    for db in range(1, 16):
        if client.set(f"lcmq-test-lock:{db}", token, nx=True, ex=3600):
            redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
            yield db
            redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
            if client.get(f"lcmq-test-lock:{db}") == token.encode():
                client.delete(f"lcmq-test-lock:{db}")
            return
    pytest.fail("no free Redis database among 1-15 for this test session")


@pytest.fixture(scope="session")
def redis_url(redis_db):
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server as a real HTTP process on a loopback port, with the test bucket."""
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log", bucket=BUCKET)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """One cache of generated models for the whole session (tiny builds in a few seconds)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def models_settings(models_dir):
    """Settings whose models dir is the session's cache, for tests that load pipelines in this
    process (LCMQ_MODELS_DIR set for the module, then restored)."""
    from lcmq.settings import get_settings, reset_settings

    os.environ["LCMQ_MODELS_DIR"] = str(models_dir)
    reset_settings()
    try:
        yield get_settings()
    finally:
        os.environ.pop("LCMQ_MODELS_DIR", None)
        reset_settings()


# --- settings ---------------------------------------------------------------------------


def _apply_env(monkeypatch, env: dict[str, str]) -> dict[str, str]:
    for key in [k for k in os.environ if k.startswith("LCMQ_")]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    reset_settings()
    get_app.cache_clear()
    return {**os.environ}


@pytest.fixture
def embedded_env(tmp_path, monkeypatch, models_dir):
    """The embedded default (SQLite, filesystem broker, local folder) under a temp dir."""
    monkeypatch.chdir(tmp_path)
    env = {
        "LCMQ_HOME": str(tmp_path / ".lcmq"),
        "LCMQ_STORAGE_URL": f"file://{tmp_path / 'renders'}",
        "LCMQ_MODELS_DIR": str(models_dir),
        "LCMQ_CONFIG": str(tmp_path / "lcmq.toml"),
        "LCMQ_POLL_S": "0.2",
        "LCMQ_TORCH_THREADS": "1",
    }
    yield _apply_env(monkeypatch, env)
    _reset_after(monkeypatch)


@pytest.fixture
def services_env(tmp_path, monkeypatch, models_dir, migrated_pg_url, redis_url, s3_endpoint):
    """Postgres + Redis + moto S3, each test with its own storage prefix."""
    monkeypatch.chdir(tmp_path)
    env = {
        "LCMQ_HOME": str(tmp_path / ".lcmq"),
        "LCMQ_DATABASE_URL": migrated_pg_url,
        "LCMQ_BROKER_URL": redis_url,
        "LCMQ_STORAGE_URL": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
        "LCMQ_S3_ENDPOINT_URL": s3_endpoint,
        "LCMQ_MODELS_DIR": str(models_dir),
        "LCMQ_CONFIG": str(tmp_path / "lcmq.toml"),
        "LCMQ_POLL_S": "0.2",
        "LCMQ_TORCH_THREADS": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield _apply_env(monkeypatch, env)
    _reset_after(monkeypatch)


@pytest.fixture
def snapshot(services_env):
    """A callable returning what a submit would change: table row counts and broker keys."""
    import redis
    from sqlalchemy import create_engine, text

    from lcmq.repository import normalize_url

    engine = create_engine(normalize_url(services_env["LCMQ_DATABASE_URL"]))
    broker = redis.Redis.from_url(services_env["LCMQ_BROKER_URL"])

    def take() -> dict:
        with engine.connect() as conn:
            rows = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("batches", "jobs")}
        # With batch priorities on, Redis keeps one list per priority step: render.tiny<sep><n>.
        waiting = sum(broker.llen(key) for key in broker.keys("render.tiny*") if broker.type(key) == b"list")
        return {"rows": rows, "keys": sorted(broker.keys("*")), "render.tiny": waiting}

    yield take
    engine.dispose()
    broker.close()


def _reset_after(monkeypatch):
    monkeypatch.undo()
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    reset_settings()
    get_app.cache_clear()


# --- processes --------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path):
    """Start lcmq commands (workers, a sweeper) as real subprocesses, each in its own process
    group; all are stopped at the end (killed: the test is over, no warm shutdown to wait for)."""
    started: list[Process] = []

    def start(env: dict[str, str], *args: str) -> Process:
        process = Process(env, tmp_path / f"proc-{len(started)}-{args[0]}.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.close()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server (append-only file on) that a test may stop and restart."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# Short leases and grace periods, so recoveries happen within a test's time.
QUICK_RECOVERY = {
    "LCMQ_LEASE_S": "3",  # a dead worker's jobs come back after 3 s
    "LCMQ_DISPATCH_GRACE_S": "2",
    "LCMQ_REDISPATCH_S": "4",
    "LCMQ_MAX_ATTEMPTS": "3",
    "LCMQ_S3_TIMEOUT_S": "2",
    "LCMQ_S3_MAX_ATTEMPTS": "2",
    "LCMQ_CHUNK_SIZE": "4",
    "LCMQ_BATCH_SIZE": "2",
}


@pytest.fixture
def isolated_env(services_env, redis_server, own_pg_url, monkeypatch):
    """services_env with a Redis and a database of this test's own, and quick recovery timings.

    A sweeper or worker sees every batch of its database and every message of its broker, so
    tests that run them get both to themselves. The test process uses the same settings.
    """
    env = (
        dict(services_env)
        | QUICK_RECOVERY
        | {
            "LCMQ_BROKER_URL": redis_server.url,
            "LCMQ_DATABASE_URL": own_pg_url,
            "LCMQ_STORAGE_URL": f"s3://{BUCKET}/i-{uuid.uuid4().hex[:8]}",
        }
    )
    for key, value in env.items():
        if key.startswith("LCMQ_"):
            monkeypatch.setenv(key, value)
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    reset_settings()
    get_app.cache_clear()
    return env


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "lcmq"), *args], env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def cli():
    return run_cli


def pytest_collection_modifyitems(items):
    # Fast layers first: a broken unit shows before minutes of e2e.
    order = {"unit": 0, "integration": 1, "e2e": 2}
    items.sort(key=lambda item: next((v for k, v in order.items() if f"/{k}/" in str(item.fspath)), 3))
