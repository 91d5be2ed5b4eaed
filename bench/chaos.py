"""Chaos: N jobs, workers killed (-9) and stopped (SIGTERM) at random, Redis restarted, for a
while; then let the farm drain and check that nothing was lost, doubled or left stuck.

    .venv/bin/python bench/chaos.py --jobs 200 --workers 3 --kills 6 --chaos-s 90

Needs Postgres (LCMQ_BENCH_PG, default the test server) and redis-server on PATH; starts its
own Redis (append-only file on), moto S3 server and database, and removes them at the end.
Last line: `lost=… duplicates=… stuck=… mismatched=… drain_s=… kills=… terms=… redis_restarts=…`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    Process,
    bench_world,
    done,
    outcome,
    running_jobs_of,
    wait_until,  # noqa: E402
    worker_node,
    write_prompts,  # noqa: E402
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=6, help="kill -9 this many workers during the chaos")
    parser.add_argument("--terms", type=int, default=2, help="SIGTERM this many workers during the chaos")
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--chaos-s", type=float, default=90)
    parser.add_argument("--drain-timeout-s", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="lcmq-chaos-"))
    processes: list[Process] = []

    def spawn(*command: str) -> Process:
        process = Process(env, work / f"{len(processes)}-{command[0]}.log", *command)
        processes.append(process)
        return process

    # Generated models are cached across runs, so replacement workers start in seconds.
    models = os.environ.get("LCMQ_MODELS_DIR", str(Path(".lcmq/models").resolve()))
    with bench_world(
        work,
        LCMQ_MODELS_DIR=models,
        LCMQ_TORCH_THREADS="1",
        LCMQ_LEASE_S="4",
        LCMQ_DISPATCH_GRACE_S="2",
        LCMQ_REDISPATCH_S="6",
        LCMQ_CHUNK_SIZE="4",
        LCMQ_BATCH_SIZE="2",
        LCMQ_MAX_ATTEMPTS="5",
    ) as (env, redis, _):
        try:
            from lcmq import api

            spawn("sweep", "--every", "0.5s")
            workers = [spawn("worker", "--model", "tiny") for _ in range(args.workers)]
            for worker in workers:
                worker.wait_ready()
            batch_id = api.submit(write_prompts(work / "prompts.jsonl", args.jobs), model="tiny", name="chaos").batch_id
            print(
                f"batch {batch_id}: {args.jobs} jobs, {args.workers} workers, chaos for {args.chaos_s:.0f}s",
                file=sys.stderr,
            )

            # The chaos: events spread over the window, in random order.
            events = ["kill"] * args.kills + ["term"] * args.terms + ["redis"] * args.redis_restarts
            rng.shuffle(events)
            done_events = {"kill": 0, "term": 0, "redis": 0}
            started = time.monotonic()
            for number, event in enumerate(events):
                time.sleep(max(0.0, started + args.chaos_s * (number + 1) / (len(events) + 1) - time.monotonic()))
                if event == "redis":
                    redis.restart(down_s=1.5)
                else:
                    # Prefer a worker caught rendering: that is the kill that could lose an image.
                    busy = [w for w in workers if w.alive() and running_jobs_of(batch_id, worker_node(w))]
                    victim = rng.choice(busy or [w for w in workers if w.alive()])
                    victim.kill() if event == "kill" else victim.send_term()
                    workers.remove(victim)
                    workers.append(spawn("worker", "--model", "tiny"))
                done_events[event] += 1
                print(
                    f"  t={time.monotonic() - started:5.1f}s {event} -> {api.status(batch_id).to_dict()}",
                    file=sys.stderr,
                )
            time.sleep(max(0.0, started + args.chaos_s - time.monotonic()))

            drain_started = time.monotonic()
            wait_until(lambda: done(batch_id), args.drain_timeout_s, interval_s=0.5, what="the batch to drain")
            drain_s = time.monotonic() - drain_started
            result = outcome(batch_id)
            print(
                f"{result.line()} drain_s={drain_s:.1f} total_s={time.monotonic() - started:.1f} "
                f"jobs={result.total} kills={done_events['kill']} terms={done_events['term']} "
                f"redis_restarts={done_events['redis']}"
            )
            return 0 if (result.lost, result.duplicates, result.stuck, result.mismatched) == (0, 0, 0, 0) else 1
        finally:
            for process in processes:
                process.kill()
                process.close()


if __name__ == "__main__":
    raise SystemExit(main())
