"""A real `lcmq worker --concurrency 2` on a CPU: each pool process takes half the cores for torch."""

from __future__ import annotations

import re
from pathlib import Path

from bench.harness import wait_until
from worker.threads import host_registry, machine_cores, threads_for

DECISION = re.compile(r"torch threads threads=(\d+) cores=(\d+) processes=(\d+) source=(\w+) pid=(\d+)")


def test_each_pool_process_takes_its_share_of_the_cores(embedded_env, procs):
    env = {k: v for k, v in embedded_env.items() if k != "LCMQ_TORCH_THREADS"}
    # Workers of earlier tests are gone by now; should one still live, it counts too.
    others = host_registry(Path(env["LCMQ_MODELS_DIR"]).resolve()).live_processes()
    worker = procs(env, "worker", "--model", "tiny", "--concurrency", "2", "--device", "cpu")
    wait_until(lambda: len(DECISION.findall(worker.log)) >= 2, 60, interval_s=0.2, what="both pool processes' loads")
    decisions = DECISION.findall(worker.log)
    cores, processes = machine_cores(), others + 2
    assert len({pid for *_, pid in decisions}) == 2  # one decision per pool process
    for threads, seen_cores, seen_processes, source, _pid in decisions:
        assert (int(seen_cores), int(seen_processes), source) == (cores, processes, "share")
        assert int(threads) == threads_for(cores, processes, None) == max(1, cores // processes)
