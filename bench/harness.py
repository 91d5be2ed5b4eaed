"""Real processes for the fault suite and bench/chaos.py: a private Redis with an append-only
file, a fault-injecting proxy in front of an S3 server, lcmq workers and a sweeper, and the
one check that matters: every job final, none lost, none twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(*, pgid: int | None = None, pid: int | None = None, comm: str | None = None) -> float:
    """CPU time (user + system) of live processes: a process group, one pid, or every process
    with that command name (e.g. all Postgres backends). Linux /proc only; 0.0 elsewhere."""
    total = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited while we looked
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[2] is pgrp; fields[11], fields[12] are utime and stime (proc(5), less pid and comm).
        if (
            (pgid is not None and int(fields[2]) == pgid)
            or (pid is not None and int(entry) == pid)
            or (comm is not None and name == comm)
        ):
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


class RedisServer:
    """A redis-server of our own on a free loopback port, persisting to an append-only file."""

    def __init__(self, folder: Path, password: str | None = None):
        self.folder = folder
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(self.folder / "redis.log"),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._pingable, 10, what=f"redis-server on {self.port}")
        return self

    def _pingable(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(10)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class FaultProxy:
    """An HTTP proxy in front of the S3 server that can answer 503 or hang, on command."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.mode = "pass"  # pass | error | hang
        self.faults = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.mode != "pass":
                    proxy.faults += 1
                    if proxy.mode == "hang":
                        time.sleep(30)
                        self.close_connection = True
                        return
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.target[0]}:{proxy.target[1]}"
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()


class Process:
    """An lcmq command as a real subprocess in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.log_path = log_path
        self.args = args
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "lcmq"), *args], env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 60) -> Process:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args} exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            return " ready." in self.log

        wait_until(ready, timeout_s, what=f"worker ready ({self.log_path})")
        return self

    def kill(self) -> None:
        """kill -9 of the whole worker: the Celery parent and its pool children."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def send_term(self) -> None:
        """SIGTERM without waiting: the worker finishes its micro-batch and exits on its own."""
        if self.alive():
            self.proc.terminate()

    def terminate(self, timeout_s: float = 60) -> int:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def close(self) -> None:
        self.terminate(timeout_s=20)
        self._log.close()


def worker_node(process: Process) -> str:
    """The Celery node name `lcmq worker` gives itself (profile-pid@host)."""
    return f"tiny-{process.pid}@{socket.gethostname()}"


@dataclass
class Outcome:
    total: int
    succeeded: int
    failed: int
    canceled: int
    lost: int  # jobs not final
    duplicates: int  # objects not pointed at by exactly one succeeded row, or rows sharing an object
    stuck: int  # running jobs
    # sha256 in the row differs from the object, manifest differs from rows, or a state's
    # counter (what status reads: triggers on Postgres) differs from a count of the rows
    mismatched: int
    max_attempts: int

    def line(self) -> str:
        return (
            f"lost={self.lost} duplicates={self.duplicates} stuck={self.stuck} mismatched={self.mismatched} "
            f"succeeded={self.succeeded} failed={self.failed} max_attempts={self.max_attempts}"
        )


def outcome(batch_id: str) -> Outcome:
    """Compare rows, objects and manifest of a batch (in a process whose LCMQ_* env names it)."""
    from lcmq import api
    from lcmq.models import JobState

    repo, store = api.repository(), api.storage()
    jobs = repo.jobs(batch_id)
    objects = set(store.list_keys(batch_id)) - {store.manifest_key(batch_id)}  # images only
    succeeded = [j for j in jobs if j.state == JobState.succeeded.value]
    pointed = [j.key for j in succeeded]
    duplicates = len(objects - set(pointed)) + (len(pointed) - len(set(pointed)))
    mismatched = sum(
        1 for j in succeeded if j.key not in objects or hashlib.sha256(store.get(j.key)).hexdigest() != j.sha256
    )
    manifest = {(m["key"], m["sha256"]) for m in api.manifest(batch_id)}
    mismatched += len(manifest ^ {(j.key, j.sha256) for j in succeeded})
    counted = repo.recount_states(batch_id)
    mismatched += sum(n != counted[state] for state, n in repo.state_counts(batch_id).items())
    final = {JobState.succeeded.value, JobState.failed.value, JobState.canceled.value}
    return Outcome(
        total=len(jobs),
        succeeded=len(succeeded),
        failed=sum(j.state == JobState.failed.value for j in jobs),
        canceled=sum(j.state == JobState.canceled.value for j in jobs),
        lost=sum(j.state not in final for j in jobs),
        duplicates=duplicates,
        stuck=sum(j.state == JobState.running.value for j in jobs),
        mismatched=mismatched,
        max_attempts=max((j.attempts for j in jobs), default=0),
    )


def running_jobs_of(batch_id: str, node: str) -> int:
    from lcmq import api

    return sum(1 for j in api.repository().jobs(batch_id) if j.state == "running" and j.worker == node)


def done(batch_id: str) -> bool:
    from lcmq import api

    return api.status(batch_id).done


def write_prompts(path: Path, count: int, poison_at: set[int] | None = None, marker: str = "POISON") -> Path:
    rows = [
        {"prompt": (f"{marker} " if i in (poison_at or ()) else "") + f"a small house number {i}"} for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class MotoS3:
    """moto's S3 server as a real HTTP process on a loopback port, with one bucket."""

    def __init__(self, log_path: Path, bucket: str = "lcmq-bench"):
        import boto3

        self.port = free_port()
        self.bucket = bucket
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log_path.read_text()}")
            try:
                client.list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        wait_until(up, 30, what="moto_server")
        client.create_bucket(Bucket=bucket)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


def create_database(admin_url: str) -> tuple[str, callable]:
    """A new, empty Postgres database next to admin_url's; returns (url, drop)."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"lcmq_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        from lcmq.repository import _ENGINES

        for key in [k for k in _ENGINES if k[0] == url]:
            _ENGINES.pop(key).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


PG_ADMIN = os.environ.get("LCMQ_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def bench_world(work: Path, **settings: str):
    """A private Redis, moto S3 server and migrated database for one benchmark run. Yields
    (env, redis, s3): the environment (LCMQ_* and AWS_*) that lcmq processes need, also applied to
    this process, the Redis server (to restart it) and the moto server."""
    from lcmq.migrate import upgrade

    redis = RedisServer(work / "redis").start()
    s3 = MotoS3(work / "moto.log")
    db_url, drop_db = create_database(PG_ADMIN)
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("LCMQ_")}
        | {
            "LCMQ_DATABASE_URL": db_url,
            "LCMQ_BROKER_URL": redis.url,
            "LCMQ_STORAGE_URL": f"s3://{s3.bucket}/bench",
            "LCMQ_S3_ENDPOINT_URL": s3.url,
            "LCMQ_HOME": str(work / "home"),
            "LCMQ_POLL_S": "0.05",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        | settings
    )
    os.environ.update(env)
    try:
        upgrade(db_url)
        yield env, redis, s3
    finally:
        redis.stop()
        s3.stop()
        drop_db()
