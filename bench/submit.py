"""Submit throughput and memory: a JSONL of N prompts into Postgres and Redis, end to end, at
one size or several side by side (how the cost grows with the size).

    .venv/bin/python bench/submit.py [--rows 100000] [--rows 100000 --rows 1000000 --status] [--profile]

Starts its own Redis and database (Postgres at LCMQ_BENCH_PG) and writes each prompt file
first. Each submit runs in a child process of its own (imports, a warm-up submit, then the
timed `lcmq.submit` from the call to the return: every job row committed and every chunk
published), so its peak RSS is the submitting process's own (the kernel's ru_maxrss of that
child), not this harness's. `--status`: then times `lcmq status` (api.status), the API's
GET /v1/batches/{id} and GET /metrics on the largest batch, best of 10 each, printed as
`status_ms=… api_status_ms=… metrics_ms=…`. One JSON line per size; last line (the largest):
`seconds=… jobs_per_s=… peak_rss_mb=…`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import bench_world  # noqa: E402


def write_prompts(path: Path, rows: int) -> None:
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"prompt": f"product photo of item {i}, studio light", "sku": f"A-{i}"}) + "\n")


def submit_child(path: Path, rows: int, profile: bool) -> int:
    """In the child: warm up, time one submit, print its figures as one JSON line."""
    from lcmq import api
    from lcmq.queue import queue_length

    api.submit([{"prompt": f"warm up {time.time_ns()}"}], model="tiny")  # imports and connections
    before = queue_length("tiny")
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    status = api.submit(path, model="tiny")
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    assert status.total == rows and api.repository().recount_states(status.batch_id)["queued"] == rows, status
    if profiler:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": round(seconds, 2),
                "jobs_per_s": round(rows / seconds),
                "messages": queue_length("tiny") - before,
                "batch_id": status.batch_id,
            }
        )
    )
    return 0


def run_child(path: Path, rows: int, profile: bool) -> dict:
    """One submit in a child process; its JSON line, with its peak RSS from wait4's rusage."""
    command = [sys.executable, __file__, "--child", str(path), "--rows", str(rows), *(["--profile"] if profile else [])]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    out = child.stdout.read()
    _, code, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(code)
    if child.returncode != 0:
        raise SystemExit(f"the submit of {rows} rows failed ({child.returncode}):\n{out}")
    result = json.loads(out.strip().splitlines()[-1])
    return result | {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # Linux: ru_maxrss in KiB


def best_ms(call, times: int = 10) -> float:
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        call()
        best = min(best, (time.perf_counter() - started) * 1000)
    return round(best, 2)


def time_status(batch_id: str) -> dict[str, float]:
    """api.status (what `lcmq status` prints), the API's batch status and /metrics, in process."""
    from fastapi.testclient import TestClient

    from lcmq import access, api
    from lcmq.http.app import create_app

    app = create_app(run_background=False)
    key = access.create_key(app.state.repo, f"bench-{time.time_ns()}", admin=True).key
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:

        def batch_route() -> None:
            assert client.get(f"/v1/batches/{batch_id}", headers=headers).status_code == 200

        def metrics_route() -> None:
            assert client.get("/metrics").status_code == 200

        return {
            "status_ms": best_ms(lambda: api.status(batch_id)),
            "api_status_ms": best_ms(batch_route),
            "metrics_ms": best_ms(metrics_route),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="rows per submit; repeat to compare sizes")
    parser.add_argument("--status", action="store_true", help="then time status, the API's and /metrics")
    parser.add_argument("--profile", action="store_true", help="print where the time goes (cProfile)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: submit this file
    args = parser.parse_args()
    sizes = args.rows or [100_000]
    if args.child:
        return submit_child(args.child, sizes[0], args.profile)

    work = Path(tempfile.mkdtemp(prefix="lcmq-submit-"))
    with bench_world(work):
        results = []
        for rows in sizes:
            path = work / f"prompts-{rows}.jsonl"
            write_prompts(path, rows)
            results.append(run_child(path, rows, args.profile))
            path.unlink()
            print(json.dumps(results[-1]), flush=True)
        largest = max(results, key=lambda r: r["rows"])
        smallest = min(results, key=lambda r: r["rows"])
        if len(results) > 1:
            growth = largest["seconds"] / smallest["seconds"]
            print(json.dumps({"size_ratio": largest["rows"] / smallest["rows"], "time_ratio": round(growth, 2)}))
        if args.status:
            from lcmq import api

            sizes_now = api.repository().jobs_table_sizes()  # every batch submitted above
            jobs_now = sum(r["rows"] + 1 for r in results)  # each with its warm-up job
            print(json.dumps({"bytes_per_job": {k: round(v / jobs_now, 1) for k, v in sizes_now.items()}}))
            print(json.dumps({"total_bytes_per_job": round(sum(sizes_now.values()) / jobs_now, 1)}), flush=True)
            times = time_status(largest["batch_id"])
            print(" ".join(f"{name}={value}" for name, value in times.items()), flush=True)
        print(f"seconds={largest['seconds']} jobs_per_s={largest['jobs_per_s']} peak_rss_mb={largest['peak_rss_mb']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
