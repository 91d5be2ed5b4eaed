"""The queue's own cost: the `null` profile (no model, a fixed 64x64 image) through the real
broker, database and storage, with 1 and 2 workers; file storage and S3 (moto), the latter side
by side with a raw boto3 PUT loop of the same objects at the same concurrency.

    .venv/bin/python bench/dispatch.py [--jobs 4000] [--s3-jobs 1600] [--chunk-size 256]
    .venv/bin/python bench/dispatch.py --backlog 1000000

Starts its own Redis, database (Postgres at LCMQ_BENCH_PG) and moto server. Per-job overhead
comes from the workers' own `chunk done` timings. Last line (2 workers):
`jobs_per_s=… overhead_ms=… s3_ratio=…` (jobs/s and ms per job with file storage; s3_ratio =
lcmq jobs/s on S3 ÷ raw PUT/s).

`--backlog N`: the 2-worker file-storage case on the empty table, then again with N other jobs
queued in the table (a batch of another profile, submitted through the real submit path, which
no worker here serves) and N finished ones (a second such batch, canceled), in the same run.
Last line: `jobs_per_s=… empty_jobs_per_s=… backlog_ratio=…` (jobs/s with the backlog, without,
and their ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Process, bench_world, cpu_seconds, done, wait_until  # noqa: E402

PARTS = ("claim_ms", "render_ms", "wait_store_ms", "encode_ms", "upload_ms", "record_ms")
UPLOAD_THREADS = 4  # per worker: worker/tasks.py's upload pool


def chunk_timings(logs: list[str], batch_id: str) -> dict[str, float]:
    totals = {part: 0.0 for part in PARTS}
    for log in logs:
        for line in log.splitlines():
            if line.startswith("{") and '"chunk done"' in line:
                record = json.loads(line)
                if record.get("batch_id") == batch_id:
                    for part in PARTS:
                        totals[part] += record.get(part, 0.0)
    return totals


def cpu_snapshot(procs: list[Process], moto_pid: int) -> dict[str, float]:
    """CPU seconds so far of each side: on 2 cores every component competes for the same CPU,
    so the cost per job is what decides throughput, not just the waits."""
    return {
        "workers": sum(cpu_seconds(pgid=p.pid) for p in procs),
        "moto": cpu_seconds(pid=moto_pid),
        "postgres": cpu_seconds(comm="postgres"),
        "redis": cpu_seconds(comm="redis-server"),
        "bench": cpu_seconds(pid=os.getpid()),
    }


def cpu_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    return {k: round((after[k] - before[k]) * 1000 / jobs, 3) for k in before}


def run_case(env: dict[str, str], work: Path, storage_url: str, workers: int, jobs: int, moto_pid: int) -> dict:
    from lcmq import api

    case_env = env | {"LCMQ_STORAGE_URL": storage_url}
    os.environ.update(case_env)
    from lcmq.settings import reset_settings

    reset_settings()
    procs = [
        Process(case_env, work / f"w{workers}-{time.time_ns()}.log", "worker", "--model", "null", "--batch-size", "32")
        for _ in range(workers)
    ]
    try:
        for proc in procs:
            proc.wait_ready()
        cpu_before = cpu_snapshot(procs, moto_pid)
        started = time.perf_counter()
        batch_id = api.submit([f"job {i} {time.time_ns()}" for i in range(jobs)], model="null").batch_id
        wait_until(lambda: done(batch_id), 600, interval_s=0.05, what="the batch")
        seconds = time.perf_counter() - started
        cpu = cpu_per_job(cpu_before, cpu_snapshot(procs, moto_pid), jobs)
        assert api.status(batch_id).succeeded == jobs
    finally:
        for proc in procs:
            proc.terminate()
    parts = chunk_timings([p.log for p in procs], batch_id)
    busy_ms = seconds * 1000 * workers  # worker-time spent on the batch
    per_job = {k.removesuffix("_ms"): round(v / jobs, 3) for k, v in parts.items()}
    # What the chunk timings do not cover: the broker, Celery, task start-up, the submit.
    per_job["broker_and_rest"] = round(
        (busy_ms - parts["claim_ms"] - parts["render_ms"] - parts["wait_store_ms"]) / jobs, 3
    )
    return {
        "storage": storage_url.split(":")[0],
        "workers": workers,
        "jobs": jobs,
        "seconds": round(seconds, 2),
        "jobs_per_s": round(jobs / seconds, 1),
        "overhead_ms": round(busy_ms / jobs, 3),
        "per_job_ms": per_job,
        "cpu_ms_per_job": cpu,
    }


def raw_put_rate(endpoint: str, bucket: str, count: int, threads: int, moto_pid: int) -> tuple[float, dict]:
    """boto3 put_object of the same objects (the null image's PNG) at the same concurrency."""
    import boto3
    from PIL import Image

    from worker.encode import encode_png

    data = encode_png(Image.new("RGB", (64, 64), (127, 127, 127)), "a prompt\nSteps: 4")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    cpu_before = cpu_snapshot([], moto_pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda i: client.put_object(
                    Bucket=bucket, Key=f"raw/{i:06d}.png", Body=data, ContentType="image/png", Metadata={"sha256": "x"}
                ),
                range(count),
            )
        )
    rate = count / (time.perf_counter() - started)
    return rate, cpu_per_job(cpu_before, cpu_snapshot([], moto_pid), count)


def fill_backlog(work: Path, rows: int) -> dict[str, float]:
    """`rows` queued jobs and `rows` finished (canceled) ones of the `tiny` profile, written by
    lcmq's own submit (COPY) and cancel; then the table is vacuumed and analysed, as autovacuum
    would soon do, so that it does not run during the measurement."""
    from lcmq import api

    timings = {}
    batches = []
    for kind in ("queued", "finished"):
        path = work / f"backlog-{kind}.jsonl"
        with path.open("w") as fh:
            for i in range(rows):
                fh.write(json.dumps({"prompt": f"{kind} backlog item {i}"}) + "\n")
        started = time.perf_counter()
        batches.append(api.submit(path, model="tiny").batch_id)
        timings[f"submit_{kind}_s"] = round(time.perf_counter() - started, 1)
        path.unlink()
    started = time.perf_counter()
    assert api.cancel(batches[1]).canceled == rows
    timings["cancel_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    api.repository().vacuum_jobs()
    timings["vacuum_s"] = round(time.perf_counter() - started, 1)
    assert api.status(batches[0]).queued == rows
    sizes = api.repository().jobs_table_sizes()  # table and indexes, over every job now in it
    timings["bytes_per_job"] = round(sum(sizes.values()) / (2 * rows), 1)
    timings["table_mb"] = {name: round(size / 2**20, 1) for name, size in sizes.items()}
    return timings


def backlog_run(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="lcmq-dispatch-"))
    with bench_world(work, LCMQ_CHUNK_SIZE=str(args.chunk_size), LCMQ_LOG_JSON="true") as (env, _, s3):
        storage_url = f"file://{work}/out"
        run_case(env, work, storage_url, 2, args.jobs // 4, s3.proc.pid)  # warm-up: first imports, caches
        empty = run_case(env, work, storage_url, 2, args.jobs, s3.proc.pid)
        print(json.dumps({"table": "empty"} | empty), flush=True)
        print(json.dumps({"backlog": args.backlog} | fill_backlog(work, args.backlog)), flush=True)
        full = run_case(env, work, storage_url, 2, args.jobs, s3.proc.pid)
        print(json.dumps({"table": f"{args.backlog} queued + {args.backlog} finished"} | full), flush=True)
        print(
            f"jobs_per_s={full['jobs_per_s']} empty_jobs_per_s={empty['jobs_per_s']} "
            f"backlog_ratio={full['jobs_per_s'] / empty['jobs_per_s']:.2f}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--s3-jobs", type=int, default=1600)
    # A task of about a second at these rates ("seconds, not milliseconds"): each chunk ends by
    # waiting for its last micro-batch's uploads, a gap that a longer chunk amortises.
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--backlog", type=int, default=0, help="compare with this many other jobs queued and finished")
    args = parser.parse_args()
    if args.backlog:
        return backlog_run(args)
    work = Path(tempfile.mkdtemp(prefix="lcmq-dispatch-"))
    with bench_world(work, LCMQ_CHUNK_SIZE=str(args.chunk_size), LCMQ_LOG_JSON="true") as (env, _, s3):
        bucket = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/")[0]
        results = []
        for storage_url, jobs in ((f"file://{work}/out", args.jobs), (env["LCMQ_STORAGE_URL"], args.s3_jobs)):
            for workers in (1, 2):
                result = run_case(env, work, storage_url, workers, jobs, s3.proc.pid)
                results.append(result)
                print(json.dumps(result))
        raw, raw_cpu = raw_put_rate(
            env["LCMQ_S3_ENDPOINT_URL"], bucket, args.s3_jobs, threads=2 * UPLOAD_THREADS, moto_pid=s3.proc.pid
        )
        file2, s3_2 = results[1], results[3]
        print(json.dumps({"raw_put_per_s": round(raw, 1), "threads": 2 * UPLOAD_THREADS, "cpu_ms_per_put": raw_cpu}))
        print(
            f"jobs_per_s={file2['jobs_per_s']} overhead_ms={file2['overhead_ms']} "
            f"s3_ratio={s3_2['jobs_per_s'] / raw:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
