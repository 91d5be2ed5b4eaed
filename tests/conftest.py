"""Shared fixtures: real Postgres, Redis and moto's S3 server; embedded settings; workers.

Postgres and Redis are the machine's own services. Each test session gets its own database
and its own Redis database number, so sessions running side by side never see each other.
Without the services a test is skipped on a laptop and fails under CI=true.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("LCMQ_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("LCMQ_TEST_REDIS_PORT", "6379"))
BUCKET = "lcmq-test"
VENV_BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_missing(what: str, exc: Exception):
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# --- services ---------------------------------------------------------------------------

def _create_database():
    """A new, empty Postgres database; returns (url, drop)."""
    from sqlalchemy import create_engine, text

    name = f"lcmq_t_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any driver error means the service is missing
        service_missing("PostgreSQL at 127.0.0.1:5432", exc)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name

    def drop():
        from lcmq.repository import _ENGINES

        for key in [k for k in _ENGINES if k[0] == url]:
            _ENGINES.pop(key).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


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
    """moto's S3 server as a real HTTP process on a loopback port, with one bucket."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def up():
        try:
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not listening yet
            return proc.poll() is not None and pytest.fail(f"moto_server exited: {log.read_text()}")

    wait_until(up, 30, what="moto_server")
    client.create_bucket(Bucket=BUCKET)
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """One cache of generated models for the whole session (tiny builds in a few seconds)."""
    return tmp_path_factory.mktemp("models")


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
    env = {"LCMQ_HOME": str(tmp_path / ".lcmq"), "LCMQ_STORAGE_URL": f"file://{tmp_path / 'renders'}",
           "LCMQ_MODELS_DIR": str(models_dir), "LCMQ_CONFIG": str(tmp_path / "lcmq.toml"),
           "LCMQ_POLL_S": "0.2", "LCMQ_TORCH_THREADS": "1"}
    yield _apply_env(monkeypatch, env)
    _reset_after(monkeypatch)


@pytest.fixture
def services_env(tmp_path, monkeypatch, models_dir, migrated_pg_url, redis_url, s3_endpoint):
    """Postgres + Redis + moto S3, each test with its own storage prefix."""
    monkeypatch.chdir(tmp_path)
    env = {"LCMQ_HOME": str(tmp_path / ".lcmq"), "LCMQ_DATABASE_URL": migrated_pg_url,
           "LCMQ_BROKER_URL": redis_url, "LCMQ_STORAGE_URL": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
           "LCMQ_S3_ENDPOINT_URL": s3_endpoint, "LCMQ_MODELS_DIR": str(models_dir),
           "LCMQ_CONFIG": str(tmp_path / "lcmq.toml"), "LCMQ_POLL_S": "0.2", "LCMQ_TORCH_THREADS": "1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    yield _apply_env(monkeypatch, env)
    _reset_after(monkeypatch)


def _reset_after(monkeypatch):
    monkeypatch.undo()
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    reset_settings()
    get_app.cache_clear()


# --- processes --------------------------------------------------------------------------

class WorkerProcess:
    """`lcmq worker` as a real subprocess in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([str(VENV_BIN / "lcmq"), "worker", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log}")
            return " ready." in self.log
        wait_until(ready, timeout_s, what=f"worker ready ({self.log_path})")

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path):
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], *args: str) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log", *args)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "lcmq"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture
def cli():
    return run_cli


def pytest_collection_modifyitems(items):
    # Fast layers first: a broken unit shows before minutes of e2e.
    order = {"unit": 0, "integration": 1, "e2e": 2}
    items.sort(key=lambda item: next((v for k, v in order.items() if f"/{k}/" in str(item.fspath)), 3))

