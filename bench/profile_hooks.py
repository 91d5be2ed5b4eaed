"""cProfile inside a real `lcmq worker`, for finding where the queue's side loses time (py-spy is
not available here). Installed by the worker's hook switch (worker/lifecycle.py):

    LCMQ_TEST_HOOKS=bench.profile_hooks LCMQ_PROFILE_DIR=/tmp/prof PYTHONPATH=. lcmq worker ...
    .venv/bin/python bench/profile_hooks.py /tmp/prof   # the merged top entries, by own time

The render thread (each task's `ChunkRun.run`) and the store pipeline's threads (each image's
encode and upload, each micro-batch's record) are profiled separately, each thread with its own
profiler (cProfile sees one thread); every task's end writes `<pid>-<thread>.prof` files.
Never imported by the package.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import threading
from pathlib import Path

PROFILE_DIR_ENV = "LCMQ_PROFILE_DIR"
_PROFILERS: dict[str, cProfile.Profile] = {}
_LOCK = threading.Lock()


def _profiler() -> cProfile.Profile:
    name = threading.current_thread().name
    with _LOCK:
        return _PROFILERS.setdefault(name, cProfile.Profile())


def _profiled(function, dump: bool = False):
    def wrapper(*args, **kwargs):
        profiler = _profiler()
        profiler.enable()
        try:
            return function(*args, **kwargs)
        finally:
            profiler.disable()
            if dump:
                _dump()

    return wrapper


def _dump() -> None:
    folder = Path(os.environ.get(PROFILE_DIR_ENV, "lcmq-profile"))
    folder.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        profilers = dict(_PROFILERS)
    for name, profiler in profilers.items():
        profiler.dump_stats(str(folder / f"{os.getpid()}-{name}.prof"))


def install() -> None:
    """Wrap the task's run and the store pipeline's per-image and per-micro-batch work."""
    from worker import store, tasks

    tasks.ChunkRun.run = _profiled(tasks.ChunkRun.run, dump=True)
    store.StorePipeline._upload = _profiled(store.StorePipeline._upload)
    store.StorePipeline._record = _profiled(store.StorePipeline._record)


def main(folder: str, top: int = 25) -> None:
    files = sorted(Path(folder).glob("*.prof"))
    store_files = [str(path) for path in files if "lcmq-" in path.name]  # the pools' thread names
    render_files = [str(path) for path in files if "lcmq-" not in path.name]
    for group, chosen in (("render thread", render_files), ("store threads", store_files)):
        if chosen:
            print(f"=== {group}: {len(chosen)} file(s)")
            pstats.Stats(*chosen).sort_stats("tottime").print_stats(top)
            pstats.Stats(*chosen).sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
