"""Live-worker detection for the embedded broker, the no-worker watch, and the progress line."""

from __future__ import annotations

import io
import subprocess
import sys
import time

from bench.harness import wait_until
from lcmq.settings import Settings
from lcmq.workers import NoWorkerWatch, WorkerRegistry, announce, live_workers, registry


def _embedded(tmp_path) -> Settings:
    return Settings(home=tmp_path / ".lcmq", broker_url=None)


def _last_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_registry_lists_live_workers_of_a_profile(tmp_path):
    workers = WorkerRegistry(tmp_path / "workers")
    assert workers.live("tiny") == []  # no folder yet
    workers.register("tiny-1@host", "tiny")
    workers.register("sd15-1@host", "sd15")
    assert workers.live("tiny") == ["tiny-1@host"]
    assert workers.live("sdxl") == []


def test_a_killed_workers_entry_does_not_count_and_is_removed(tmp_path):
    folder = tmp_path / "workers"
    killed = (
        f"from pathlib import Path\nfrom lcmq.workers import WorkerRegistry\n"
        f"WorkerRegistry(Path({str(folder)!r})).register('tiny-1@host', 'tiny')\n"
        "import os\nos._exit(0)  # as a SIGKILL would: no clean-up"
    )
    subprocess.run([sys.executable, "-c", killed], check=True)
    assert len(list(folder.glob("*.json"))) == 1
    assert WorkerRegistry(folder).live("tiny") == []
    assert list(folder.glob("*.json")) == []


def test_a_forked_child_exiting_leaves_its_parents_entry(tmp_path):
    workers = WorkerRegistry(tmp_path / "workers")
    workers.register("tiny-1@host", "tiny")
    workers.unregister("tiny-1@host", pid=_last_pid())  # another process: not its entry
    assert workers.live("tiny") == ["tiny-1@host"]


def test_announce_registers_for_the_filesystem_broker_only(tmp_path):
    settings = _embedded(tmp_path)
    announce(settings, "tiny-9@host", "tiny")
    assert live_workers(settings, "tiny") == ["tiny-9@host"]
    redis = Settings(home=tmp_path / "other", broker_url="redis://127.0.0.1:1/0")
    announce(redis, "tiny-9@host", "tiny")
    assert not (tmp_path / "other").exists()


def _settle(watch: NoWorkerWatch, queued: int, running: int) -> None:
    """observe() until no look is in flight (it answers in a background thread)."""
    watch.observe(queued, running)
    wait_until(lambda: watch.probe is None or watch.probe.finished, 10, what="the look for workers")
    watch.observe(queued, running)


def test_watch_tells_once_when_jobs_wait_and_no_worker_serves_the_profile(tmp_path):
    told: list[str] = []
    watch = NoWorkerWatch(_embedded(tmp_path), "tiny", told.append, after_s=0.0)
    _settle(watch, queued=3, running=0)
    assert told == ["tiny"]
    _settle(watch, queued=3, running=0)
    assert told == ["tiny"]  # once


def test_watch_says_nothing_while_a_worker_serves_or_runs_jobs(tmp_path):
    told: list[str] = []
    settings = _embedded(tmp_path)
    registry(settings).register("tiny-1@host", "tiny")
    watch = NoWorkerWatch(settings, "tiny", told.append, after_s=0.0)
    _settle(watch, queued=3, running=0)
    _settle(watch, queued=0, running=3)
    other = NoWorkerWatch(settings, "sd15", told.append, after_s=0.0)
    _settle(other, queued=0, running=3)  # running jobs: a worker is there, no look needed
    assert told == [] and other.probe is None


def test_watch_waits_its_grace_before_looking(tmp_path):
    watch = NoWorkerWatch(_embedded(tmp_path), "tiny", print, after_s=60.0)
    watch.observe(3, 0)
    time.sleep(0.05)
    watch.observe(3, 0)
    assert watch.probe is None


# --- the progress line ------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _status(done: int, total: int = 4, running: int = 0):
    from lcmq.api import BatchStatus

    return BatchStatus(
        batch_id="b",
        total=total,
        queued=total - done - running,
        running=running,
        succeeded=done,
        failed=0,
        canceled=0,
        output="file:///r/b/",
    )


def test_progress_off_a_terminal_is_a_plain_line_every_few_seconds_and_the_last():
    from lcmq.cli import Progress

    stream = io.StringIO()
    progress = Progress(stream, every_s=60)
    for done in range(5):
        progress(_status(done))
    lines = stream.getvalue().splitlines()
    assert lines == [
        "0/4 succeeded=0 failed=0 canceled=0 running=0 queued=4",
        "4/4 succeeded=4 failed=0 canceled=0 running=0 queued=0",
    ]
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place():
    from lcmq.cli import Progress

    stream = _Terminal()
    progress = Progress(stream)
    progress(_status(1, running=2))
    progress.note("a note above the bar")
    progress(_status(4))
    drawn = stream.getvalue()
    assert "\r" in drawn and "4/4" in drawn and "succeeded=4" in drawn and "a note above the bar\n" in drawn
