"""Submit throughput: a 100,000-prompt JSONL into Postgres and Redis, end to end.

    .venv/bin/python bench/submit.py [--prompts 100000] [--profile]

Starts its own Redis and database (Postgres at LCMQ_BENCH_PG); times `lcmq.submit` from the
call to the return, when every job row is committed and every chunk is published, then checks
both. Last line: `seconds=… jobs_per_s=… messages=…`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import bench_world  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="print where the time goes (cProfile)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lcmq-submit-"))
    with bench_world(work):  # noqa: SIM117
        from lcmq import api
        from lcmq.queue import queue_length

        path = work / "prompts.jsonl"
        with path.open("w") as fh:
            for i in range(args.prompts):
                fh.write(json.dumps({"prompt": f"product photo of item {i}, studio light", "sku": f"A-{i}"}) + "\n")
        api.submit([{"prompt": "warm up"}], model="tiny")  # imports and connections, not measured

        profiler = cProfile.Profile() if args.profile else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        status = api.submit(path, model="tiny")
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - started

        assert status.total == status.queued == args.prompts, status
        messages = queue_length("tiny") - 1  # less the warm-up's
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        print(
            f"seconds={seconds:.2f} jobs_per_s={args.prompts / seconds:.0f} messages={messages} "
            f"chunk_size={api.get_settings().chunk_size}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
