"""The torch-thread share of a CPU worker process (worker/threads.py), without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker import threads
from worker.threads import HostRegistry, quota_cores, read_quota, renders_on_cpu, threads_for, usable_cores


@pytest.mark.parametrize(
    ("cores", "processes", "setting", "expected"),
    [
        (2, 1, None, 2),  # one worker: every core
        (2, 2, None, 1),  # two workers on two cores: one each (was two each: 0.34x)
        (16, 3, None, 5),  # rounded down: never more threads than cores
        (2, 4, None, 1),  # more processes than cores: at least one thread
        (16, 4, 7, 7),  # LCMQ_TORCH_THREADS wins, whatever the share
        (4, 0, None, 4),  # nobody announced (a script): counted as one
    ],
)
def test_threads_are_the_setting_or_the_share_of_the_cores(cores, processes, setting, expected):
    assert threads_for(cores, processes, setting) == expected


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),  # no quota
        ("200000 100000\n", 2),
        ("150000 100000\n", 1),  # 1.5 CPUs: one thread is not throttled
        ("50000 100000\n", 1),  # below one CPU: still one thread
        ("-1 100000", None),  # cgroup v1's "no quota"
        ("", None),
        ("garbage here", None),
    ],
)
def test_cgroup_cpu_max_gives_whole_cpus(cpu_max, expected):
    assert quota_cores(cpu_max) == expected


def test_the_quota_is_read_from_cpu_max_then_cgroup_v1(tmp_path: Path):
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    v2.write_text("300000 100000\n")
    assert read_quota(v2, quota, period) == 3
    v2.unlink()
    quota.write_text("400000\n")
    period.write_text("100000\n")
    assert read_quota(v2, quota, period) == 4
    quota.write_text("-1\n")
    assert read_quota(v2, quota, period) is None
    quota.unlink()
    assert read_quota(v2, quota, period) is None  # neither: no cgroup limit


def test_cores_are_the_affinity_capped_by_the_quota():
    assert usable_cores(8, None) == 8
    assert usable_cores(8, 2) == 2
    assert usable_cores(2, 8) == 2  # a quota above the affinity mask adds no CPU


def test_device_settings_that_render_on_the_cpu(monkeypatch):
    assert renders_on_cpu("cpu")
    assert not renders_on_cpu("cuda") and not renders_on_cpu("mps")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert renders_on_cpu("auto") == (sys.platform != "darwin")


def test_live_commands_are_counted_by_their_pool_size_and_dead_ones_removed(tmp_path: Path):
    registry = HostRegistry(tmp_path / "host")
    assert registry.live_processes() == 0
    # A command that registered and exited (as a SIGKILL leaves it): its file stays, its lock is gone.
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from worker.threads import HostRegistry
        HostRegistry(Path({str(tmp_path / "host")!r})).register(3, "tiny")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])
    assert len(list((tmp_path / "host").glob("*.json"))) == 1
    fd = registry.register(2, "tiny")  # this process: alive, holding its lock
    try:
        assert registry.live_processes() == 2  # the dead command's 3 do not count
        assert [p.name for p in (tmp_path / "host").glob("*.json")] == [f"{os.getpid()}.json"]  # and it is gone
    finally:
        os.close(fd)
    assert registry.live_processes() == 0


def test_a_plan_counts_an_unannounced_process_itself(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(threads, "_registered_fd", None)
    monkeypatch.setattr(threads.socket, "gethostname", lambda: "box")
    fd = HostRegistry(tmp_path / ".workers" / "box").register(2, "tiny")
    try:
        plan = threads.plan_threads(tmp_path, None, cores=lambda: 6)
        assert (plan.threads, plan.cores, plan.processes, plan.source) == (2, 6, 3, "share")
        assert threads.plan_threads(tmp_path, 5, cores=lambda: 6).threads == 5
    finally:
        os.close(fd)
