"""How many torch threads a CPU worker process takes: its share of this host's cores.

Left alone, every worker process on a box takes every core for torch, and several of them
oversubscribe the CPUs (two workers of one small model ran at 0.34x of one). The rule:

    threads = LCMQ_TORCH_THREADS if set, else max(1, cores // processes)

- cores: the CPUs this process may use (its affinity mask, capped by a cgroup CPU quota), not
  os.cpu_count(), which counts the whole machine in a container.
- processes: the rendering processes of every `lcmq worker` command on this host. Each command
  announces itself with its pool size (`--concurrency`) in a host-local lock-file registry
  (`HostRegistry`) before its pool forks; a process counts the live entries when it loads.

Why lock files under the models dir (not the `workers` table or the broker folder's registry):
the count is wanted before the pipeline loads, with no database (embedded, edge workers) and
for every command sharing the CPUs, whatever its broker. A command holds an flock on its entry
for its whole life (its pool children inherit the descriptor), so a SIGKILLed command's entry
is seen as dead at once (the kernel drops its lock) and is removed by the next reader; no
heartbeat or clock is involved. Entries sit in a folder named after the host, so a models dir
shared between machines never mixes their counts.

Each process decides once, at load, from the entries it sees; a command started later does not
make earlier ones rebalance. Commands started at the same moment see each other (the entry is
written at start, the count taken seconds later at load); others should be started with
`--concurrency N` or an explicit LCMQ_TORCH_THREADS (docs/farm.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lcmq.worker")

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


# --- the pure rule --------------------------------------------------------------------------


def quota_cores(cpu_max: str) -> int | None:
    """Whole CPUs a cgroup v2 `cpu.max` line ("QUOTA PERIOD", or "max PERIOD") allows; None when
    unlimited or unreadable. Rounded down (at least 1): a thread more than the quota only gets
    throttled."""
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:  # v1 writes -1 for "no quota"
        return None
    return max(1, quota // period)


def usable_cores(affinity: int, quota: int | None) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup quota."""
    return max(1, min(affinity, quota) if quota is not None else affinity)


def threads_for(cores: int, processes: int, setting: int | None) -> int:
    """Torch intra-op threads for one process: the setting when given, else its share of the cores."""
    if setting:
        return setting
    return max(1, cores // max(1, processes))


# --- reading this machine -------------------------------------------------------------------


def read_quota(
    v2: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA, v1_period: Path = CGROUP_V1_PERIOD
) -> int | None:
    """The cgroup CPU quota in whole CPUs (v2 `cpu.max`, else v1 `cfs_quota_us`/`cfs_period_us`)."""
    try:
        return quota_cores(v2.read_text())
    except OSError:
        pass
    try:
        return quota_cores(f"{v1_quota.read_text().strip()} {v1_period.read_text().strip()}")
    except OSError:
        return None


def affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_cores() -> int:
    return usable_cores(affinity_cores(), read_quota())


# --- the host registry ----------------------------------------------------------------------


class HostRegistry:
    """The `lcmq worker` commands of this host: one JSON file each, flock-held while it lives."""

    def __init__(self, folder: Path):
        self.folder = folder

    def register(self, processes: int, profile: str) -> int:
        """Announce this command and its pool size; returns the open, locked descriptor, which the
        caller keeps open for the command's life (closing it withdraws the entry)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"pid": os.getpid(), "processes": processes, "profile": profile}
        final = self.folder / f"{os.getpid()}.json"
        temporary = final.with_suffix(".tmp")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        # Locked before it gets its final name: a reader never finds an unlocked live entry.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps(entry).encode())
        os.replace(temporary, final)
        return fd

    def live_processes(self) -> int:
        """The rendering processes of every live command here; dead commands' entries are removed."""
        total = 0
        for path in sorted(self.folder.glob("*.json")):
            entry = _read_if_held(path)
            if entry is not None:
                total += max(1, int(entry.get("processes", 1)))
        return total


def _read_if_held(path: Path) -> dict | None:
    """The entry when its command still holds the lock; a dead command's file is removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # removed while we looked
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: alive
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
        path.unlink(missing_ok=True)  # we got the lock: nobody holds it any more
        return None
    finally:
        os.close(fd)


def host_registry(models_dir: Path) -> HostRegistry:
    return HostRegistry(models_dir / ".workers" / socket.gethostname())


# This process's entry (inherited by forked pool children, who are counted in it).
_registered_fd: int | None = None


def register_command(models_dir: Path, processes: int, profile: str) -> None:
    """At the start of `lcmq worker`, before the pool forks: count this command's processes."""
    global _registered_fd
    if _registered_fd is not None:
        return
    try:
        _registered_fd = host_registry(models_dir).register(processes, profile)
    except OSError as exc:  # a read-only models dir: this command is not counted, not stopped
        log.warning("worker not announced for thread sharing", extra={"error": f"{type(exc).__name__}: {exc}"})


def renders_on_cpu(device: str) -> bool:
    """Whether a command with this device setting renders on the CPU, decided without importing
    torch (the prefork parent must not touch CUDA): `auto` means CPU where no NVIDIA device node
    is visible or CUDA_VISIBLE_DEVICES hides them all, and never on macOS (MPS)."""
    if device != "auto":
        return device == "cpu"
    if sys.platform == "darwin":
        return False
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    return hidden or not Path("/dev/nvidiactl").exists()


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    cores: int
    processes: int
    source: str  # "setting" or "share"


def plan_threads(models_dir: Path, setting: int | None, cores: Callable[[], int] = machine_cores) -> ThreadPlan:
    """This process's torch threads from the cores and the worker processes it sees now."""
    usable = cores()
    try:
        seen = host_registry(models_dir).live_processes()
    except OSError:
        seen = 0
    # A process that no command announced (a script calling load_pipeline) counts itself too.
    processes = max(1, seen + (0 if _registered_fd is not None else 1))
    return ThreadPlan(threads_for(usable, processes, setting), usable, processes, "setting" if setting else "share")
