"""The first hour: a new folder renders with one command, a wait without a worker says which
command starts one, and a user sees lcmq's own lines only."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from PIL import Image

from bench.harness import VENV_BIN, wait_until, worker_node
from lcmq.settings import get_settings
from lcmq.workers import live_workers

PROMPTS = "a red fox in the snow\na blue owl at night\na green frog on a leaf\n"
HINT = "start one with `lcmq worker --model tiny`"


def _new_folder_env(embedded_env: dict[str, str]) -> dict[str, str]:
    """No LCMQ_* but the model cache (so tiny is not generated again) and one torch thread."""
    keep = ("LCMQ_MODELS_DIR", "LCMQ_TORCH_THREADS")
    return {k: v for k, v in embedded_env.items() if not k.startswith("LCMQ_") or k in keep}


def _only_lcmq_lines(stderr: str) -> None:
    for noise in ("WARNING", "Traceback", "celery", "No hostname"):
        assert noise not in stderr, stderr


def test_run_renders_a_prompt_file_in_a_new_folder(embedded_env, cli, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    done = cli(_new_folder_env(embedded_env), "run", "prompts.txt", "--model", "tiny", timeout_s=600)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"images are in (file://\S+)", done.stdout)
    assert match, done.stdout
    assert done.stdout.count(match.group(1)) == 1  # the location once
    folder = Path(match.group(1).removeprefix("file://"))
    assert folder.parent == tmp_path / "renders"
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(3)]
    assert all(Image.open(p).size == (64, 64) for p in pngs)
    _only_lcmq_lines(done.stderr)
    assert "3/3" in done.stderr  # the progress line, plain: stderr is not a terminal
    # Celery's banner and the worker's log lines went to the worker's log file.
    assert "render.tiny" in (tmp_path / ".lcmq" / "logs" / "worker-tiny.log").read_text()
    # Nothing of lcmq's lands beside the user's file but its state folder and the images.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lcmq", "prompts.txt", "renders"]
    # The same command again finds the finished batch and starts no worker.
    again = cli(_new_folder_env(embedded_env), "run", "prompts.txt", "--model", "tiny", timeout_s=120)
    assert again.returncode == 0 and again.stdout == done.stdout


def test_run_interrupted_leaves_no_worker_and_goes_on_when_run_again(embedded_env, cli, tmp_path):
    from lcmq import api
    from lcmq.workers import registry

    (tmp_path / "prompts.txt").write_text("".join(f"a lighthouse, view {i}\n" for i in range(24)))
    env = embedded_env | {"LCMQ_CHUNK_SIZE": "4", "LCMQ_BATCH_SIZE": "2"}
    command = [str(VENV_BIN / "lcmq"), "run", "prompts.txt", "--model", "tiny"]
    running = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = _Lines(running)
        wait_until(lambda: stderr.first("a worker is starting"), 60, what="the batch line")
        batch_id = re.search(r"batch (\w+):", stderr.text).group(1)
        wait_until(lambda: api.status(batch_id).succeeded > 0, 300, interval_s=0.5, what="a first image")
        entries = registry(get_settings()).folder.glob("*.json")
        worker_pids = [json.loads(entry.read_text())["pid"] for entry in entries]
        running.send_signal(signal.SIGINT)  # Ctrl-C
        assert running.wait(timeout=120) == 130
    finally:
        if running.poll() is None:
            running.kill()
    assert "stopped" in stderr.text and "Traceback" not in stderr.text
    assert len(worker_pids) == 1 and not Path(f"/proc/{worker_pids[0]}").exists()  # stopped with it
    assert registry(get_settings()).live("tiny") == []
    done = cli(env, "run", "prompts.txt", "--model", "tiny", timeout_s=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"batch {batch_id}: 24/24 succeeded" in done.stdout  # the same batch, finished


def test_run_with_a_mistake_starts_no_worker(embedded_env, cli, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red fox"}\n{"prompt": "an owl", "steps": 0}\n')
    done = cli(_new_folder_env(embedded_env), "run", "prompts.jsonl", "--model", "tiny", timeout_s=120)
    assert done.returncode == 2
    assert "prompts.jsonl:2:steps:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".lcmq" / "logs").exists()


def test_run_stops_when_its_worker_cannot_start(embedded_env, cli, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    (tmp_path / "lcmq.toml").write_text('[profiles.missing]\nfamily = "sd15"\nbase = "/nonexistent/model"\n')
    done = cli(_new_folder_env(embedded_env), "run", "prompts.txt", "--model", "missing", timeout_s=300)
    assert done.returncode == 1
    assert "the worker exited" in done.stderr and "base path /nonexistent/model does not exist" in done.stderr


def test_submit_in_a_new_folder_needs_no_other_command(embedded_env, cli, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    done = cli(_new_folder_env(embedded_env), "submit", "prompts.txt", "--model", "tiny", timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[0-9a-f]{16}\n", done.stdout)
    assert done.stderr == ""  # no "No hostname was supplied", no migration chatter


class _Lines:
    """A process's stderr, read line by line in a thread, with when each line came."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append((time.monotonic(), line))

    def first(self, text: str) -> float | None:
        return next((at for at, line in self.lines if text in line), None)

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def test_submit_wait_without_a_worker_says_how_to_start_one(embedded_env, tmp_path, procs):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    started = time.monotonic()
    waiting = subprocess.Popen(
        [str(VENV_BIN / "lcmq"), "submit", "prompts.txt", "--model", "tiny", "--wait", "--timeout", "300"],
        env=embedded_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = _Lines(waiting)
        hinted_at = wait_until(lambda: stderr.first(HINT), 30, what="the no-worker hint")
        assert hinted_at - started < 15, stderr.text  # ~3 s after the jobs were queued
        time.sleep(1.5)
        assert waiting.poll() is None, stderr.text  # still waiting
        # A worker started now serves the waiting batch; the hint is not repeated meanwhile.
        procs(embedded_env, "worker", "--model", "tiny")
        assert waiting.wait(timeout=300) == 0, stderr.text
        assert "3/3 succeeded" in waiting.stdout.read()
        assert stderr.text.count(HINT) == 1
    finally:
        if waiting.poll() is None:
            waiting.kill()


def test_status_watch_without_a_worker_says_how_to_start_one(embedded_env, cli, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    batch_id = cli(embedded_env, "submit", "prompts.txt", "--model", "tiny").stdout.strip()
    watching = subprocess.Popen(
        [str(VENV_BIN / "lcmq"), "status", batch_id, "--watch"],
        env=embedded_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = _Lines(watching)
        wait_until(lambda: stderr.first(HINT), 30, what="the no-worker hint")
        assert watching.poll() is None, stderr.text  # still watching
    finally:
        watching.kill()
        watching.wait()


# --- a farm's services: Postgres, Redis, S3 -----------------------------------------------


def test_run_against_postgres_redis_and_s3_starts_a_worker_with_those_settings(isolated_env, cli, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    done = cli(isolated_env, "run", "prompts.txt", "--model", "tiny", timeout_s=600)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"images are in (s3://\S+)", done.stdout)
    assert match and match.group(1).startswith(isolated_env["LCMQ_STORAGE_URL"]), done.stdout
    batch_id = match.group(1).rstrip("/").rsplit("/", 1)[-1]
    manifest = cli(isolated_env, "manifest", batch_id).stdout.splitlines()
    assert len(manifest) == 3
    _only_lcmq_lines(done.stderr)


def test_submit_wait_on_redis_without_a_worker_says_how_to_start_one(isolated_env, tmp_path, procs):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    waiting = subprocess.Popen(
        [str(VENV_BIN / "lcmq"), "submit", "prompts.txt", "--model", "tiny", "--wait", "--timeout", "300"],
        env=isolated_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = _Lines(waiting)
        wait_until(lambda: stderr.first(HINT), 30, what="the no-worker hint")
        worker = procs(isolated_env, "worker", "--model", "tiny").wait_ready(timeout_s=120)
        assert live_workers(get_settings(), "tiny") == [worker_node(worker)]  # Celery's remote control
        assert waiting.wait(timeout=300) == 0, stderr.text
        assert stderr.text.count(HINT) == 1
    finally:
        if waiting.poll() is None:
            waiting.kill()
