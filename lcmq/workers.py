"""Which workers are alive on a profile's queue, so that a waiting command can say when none is.

With Redis, Celery's remote control answers: every worker replies to `inspect` with the queues
it consumes. The filesystem broker has no broadcast, so an embedded worker announces itself
with a file under the broker folder (`announce`), which names its process; a file whose
process is gone (a SIGKILL leaves it behind) does not count, and is removed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lcmq.settings import Settings

log = logging.getLogger("lcmq.workers")

INSPECT_TIMEOUT_S = 1.0  # how long Celery's remote control waits for workers' replies


class WorkerRegistry:
    """The embedded workers of one broker folder: a JSON file each, named after the node."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, node: str) -> Path:
        return self.folder / f"{node.replace('/', '_')}.json"

    def register(self, node: str, profile: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"node": node, "profile": profile, "pid": os.getpid(), "host": socket.gethostname()}
        temporary = self._path(node).with_suffix(".tmp")
        temporary.write_text(json.dumps(entry))
        temporary.replace(self._path(node))  # a reader never sees half a file

    def unregister(self, node: str, pid: int) -> None:
        """Forget `node` if `pid` is this process: a forked pool child exiting leaves its parent's entry."""
        if pid == os.getpid():
            self._path(node).unlink(missing_ok=True)

    def live(self, profile: str) -> list[str]:
        """Nodes serving `profile` whose process is alive."""
        nodes = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):  # unregistered while we looked
                continue
            if not _alive(entry):
                path.unlink(missing_ok=True)
            elif entry.get("profile") == profile:
                nodes.append(entry["node"])
        return nodes


def _alive(entry: dict) -> bool:
    if entry.get("host") != socket.gethostname():
        return True  # another host sharing the folder: its process cannot be checked from here
    try:
        os.kill(int(entry["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def registry(settings: Settings) -> WorkerRegistry:
    return WorkerRegistry(settings.broker_folder / "workers")


def announce(settings: Settings, node: str, profile: str) -> None:
    """Registers this process as a worker of `profile` until it exits (filesystem broker only:
    with Redis the workers answer Celery's remote control). A SIGKILL leaves the entry behind,
    and `live` drops it: its process is gone."""
    if not settings.embedded_broker:
        return
    workers = registry(settings)
    workers.register(node, profile)
    atexit.register(workers.unregister, node, os.getpid())


def live_workers(settings: Settings, profile: str) -> list[str]:
    """Nodes consuming `profile`'s queue now. With Redis this takes up to INSPECT_TIMEOUT_S."""
    if settings.embedded_broker:
        return registry(settings).live(profile)
    from lcmq.profiles import queue_name
    from lcmq.queue import get_app

    replies = get_app().control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    wanted = queue_name(profile)
    return sorted(node for node, queues in replies.items() if any(q.get("name") == wanted for q in queues))


class _Probe:
    """One look for live workers in a daemon thread: `found` once it has answered (None when
    it could not tell, e.g. the broker is down)."""

    def __init__(self, look: Callable[[], list[str]]):
        self.found: list[str] | None = None
        self._thread = threading.Thread(target=self._run, args=(look,), name="lcmq-worker-probe", daemon=True)
        self._thread.start()

    def _run(self, look: Callable[[], list[str]]) -> None:
        try:
            self.found = look()
        except Exception as exc:  # noqa: BLE001 - a hint is not worth failing the wait for
            log.debug("could not look for live workers", extra={"error": str(exc)})

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()


class NoWorkerWatch:
    """Tells `on_no_worker(profile)` when a batch has had jobs queued and none running for
    `after_s` seconds and no worker serves its profile. Looks in a background thread, at most
    every `after_s`, so the caller's polling never waits on the broker. Tells once, and again
    only after a worker was seen in between (a worker that came and died)."""

    def __init__(self, settings: Settings, profile: str, on_no_worker: Callable[[str], None], after_s: float):
        self.settings, self.profile, self.on_no_worker, self.after_s = settings, profile, on_no_worker, after_s
        self.idle_since: float | None = None
        self.probe: _Probe | None = None
        self.last_probe_at = float("-inf")
        self.told = False

    def observe(self, queued: int, running: int) -> None:
        now = time.monotonic()
        if running or not queued:
            self.idle_since = None
            if running:
                self.told = False  # a worker is here: tell again if it goes
            return
        if self.idle_since is None:
            self.idle_since = now
        self._read_probe()
        waited_enough = now - self.idle_since >= self.after_s and now - self.last_probe_at >= self.after_s
        if self.probe is None and waited_enough:
            self.probe, self.last_probe_at = _Probe(self._look), now

    def _look(self) -> list[str]:
        return live_workers(self.settings, self.profile)

    def _read_probe(self) -> None:
        if self.probe is None or not self.probe.finished:
            return
        found, self.probe = self.probe.found, None
        if found:
            self.told = False
        elif found is not None and not self.told:
            self.told = True
            self.on_no_worker(self.profile)
