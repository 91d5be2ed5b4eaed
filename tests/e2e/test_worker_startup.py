"""A worker that cannot work says so and exits before it consumes anything; a worker told to stop
(SIGTERM) at any point of its start-up exits within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from bench.harness import VENV_BIN, free_port, wait_until, write_prompts
from lcmq import api
from lcmq.queue import queue_length

START_TIMEOUT_S = 60  # a worker that consumed instead of exiting runs until this kills it
# A clean exit takes a few seconds (Celery's loop notices the signal within 2 s, the pool child
# leaves after its last micro-batch); before, a SIGTERM in the first seconds hung until SIGKILL.
EXIT_BOUND_S = 20


def _worker_exit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "lcmq"), "worker", "--model", "tiny", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )


def test_cuda_on_a_machine_without_it_exits_at_once_naming_cuda(isolated_env, tmp_path):
    import torch

    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has CUDA")
    api.submit(write_prompts(tmp_path / "p.jsonl", 3), model="tiny")
    waiting = queue_length("tiny")
    started = time.monotonic()
    done = _worker_exit(isolated_env, "--device", "cuda")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "lcmq: error: device 'cuda' requested but CUDA is not available" in done.stderr
    assert "Traceback" not in done.stderr and " ready." not in done.stderr
    assert time.monotonic() - started < 45
    assert queue_length("tiny") == waiting  # nothing consumed


def _closed_port_url(kind: str) -> str:
    port = free_port()  # bound, then released: nothing listens there
    return {
        "database": f"postgresql+psycopg://postgres@127.0.0.1:{port}/lcmq",
        "broker": f"redis://127.0.0.1:{port}/0",
        "storage": f"http://127.0.0.1:{port}",
    }[kind]


@pytest.mark.parametrize(
    ("missing", "setting", "reason"),
    [
        ("database", "LCMQ_DATABASE_URL", "cannot reach the database at postgresql+psycopg://postgres@"),
        ("broker", "LCMQ_BROKER_URL", "cannot reach the broker at redis://127.0.0.1:"),
        ("storage", "LCMQ_S3_ENDPOINT_URL", "cannot reach the storage at s3://"),
    ],
)
def test_a_missing_dependency_stops_the_start_and_consumes_nothing(isolated_env, tmp_path, missing, setting, reason):
    api.submit(write_prompts(tmp_path / "p.jsonl", 3), model="tiny")
    waiting = queue_length("tiny")
    assert waiting >= 1
    env = isolated_env | {setting: _closed_port_url(missing), "LCMQ_S3_MAX_ATTEMPTS": "1"}
    done = _worker_exit(env, "--device", "cpu")
    assert done.returncode == 1, done.stderr[-3000:]
    assert reason in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and " ready." not in done.stderr
    assert queue_length("tiny") == waiting  # the message published before is still there


# --- SIGTERM during start-up -------------------------------------------------------------


class StartingWorker:
    """`lcmq worker` in a session of its own: SIGTERM goes to its whole process group, as
    `timeout`, systemd or a terminal send it, so the pool child gets it too."""

    def __init__(self, env: dict[str, str], log_path):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.started = time.monotonic()
        command = [str(VENV_BIN / "lcmq"), "worker", "--model", "tiny", "--device", "cpu"]
        self.proc = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"worker exited early:\n{self.log[-3000:]}"
            return text in self.log

        wait_until(seen, 120, interval_s=0.02, what=f"{text!r} in {self.log_path}")

    def terminate_group(self) -> float:
        """Seconds from SIGTERM to the exit of every process of the group (SIGKILL after the bound)."""
        sent = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(EXIT_BOUND_S)
            wait_until(self._group_gone, 10, what="the pool child to exit")
        except (subprocess.TimeoutExpired, AssertionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return float("inf")
        finally:
            self._log.close()
        return time.monotonic() - sent

    def _group_gone(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False


# Seconds after the start, or a line of the worker's log to wait for.
START_UP_POINTS: dict[str, float | str] = {
    "0.3s": 0.3,
    "1.5s": 1.5,
    "ready, loading the model": " ready.",  # the pool child starts loading the pipeline as it starts
    "model loaded": "pipeline loaded",
}


@pytest.mark.parametrize("when", list(START_UP_POINTS))
def test_sigterm_at_any_point_of_start_up_exits_within_seconds(embedded_env, tmp_path, when):
    from lcmq.migrate import upgrade

    upgrade(api.repository().url)
    worker = StartingWorker(embedded_env, tmp_path / "worker.log")
    point = START_UP_POINTS[when]
    if isinstance(point, float):
        time.sleep(max(0.0, point - (time.monotonic() - worker.started)))
    else:
        worker.wait_for(point)
    took_s = worker.terminate_group()
    assert took_s < EXIT_BOUND_S, f"still running {EXIT_BOUND_S}s after SIGTERM:\n{worker.log[-3000:]}"
    # Before Celery's handler is in place SIGTERM's default action ends the process; after, the
    # warm shutdown exits 0.
    assert worker.proc.returncode in (0, -signal.SIGTERM), worker.log[-3000:]
    assert "exited with 'signal 15" not in worker.log  # the pool child was not killed mid-way


def test_a_worker_in_a_new_folder_migrates_the_embedded_database_and_starts(embedded_env, tmp_path):
    """The embedded database migrates itself on first use, and a worker started first is a use."""
    import sqlite3

    database = tmp_path / ".lcmq" / "lcmq.db"
    assert not database.exists()
    worker = subprocess.Popen(
        [str(VENV_BIN / "lcmq"), "worker", "--model", "null", "--pool", "solo"],
        env=embedded_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        announced = tmp_path / ".lcmq" / "broker" / "workers"  # written once its checks passed
        wait_until(lambda: worker.poll() is not None or any(announced.glob("*.json")), timeout_s=START_TIMEOUT_S)
        assert worker.poll() is None, worker.stderr.read()[-3000:] if worker.stderr else ""
        with sqlite3.connect(database) as conn:
            (revision,) = conn.execute("select version_num from alembic_version").fetchone()
        assert revision
    finally:
        worker.send_signal(signal.SIGTERM)  # before Celery's handler is in, SIGTERM's default ends it
        assert worker.wait(timeout=EXIT_BOUND_S) in (0, -signal.SIGTERM)
