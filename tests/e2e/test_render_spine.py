"""The render spine end to end: CLI → Redis → two real `lcmq worker` processes → S3 → Postgres."""

from __future__ import annotations

import hashlib
import io
import json

import boto3
from PIL import Image
from sqlalchemy import create_engine, text

from bench.harness import wait_until
from lcmq.repository import normalize_url

PROMPTS = 24
REQUIRED_MANIFEST_KEYS = {
    "index",
    "key",
    "sha256",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "profile",
    "worker",
    "render_ms",
    "metadata",
    "model",
    "format",
}


def test_two_workers_render_a_batch_into_s3_and_postgres(services_env, procs, cli, tmp_path):
    env = services_env
    workers = [procs(env, "worker", "--model", "tiny", "--batch-size", "4") for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    # Both hold their pipeline before the batch goes out (it loads in the background after
    # "ready"): on a loaded machine one load can take 10 s, and the other worker then renders
    # every chunk, which says nothing about the queue.
    wait_until(lambda: all("pipeline loaded" in worker.log for worker in workers), 120, what="pipelines loaded")

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"a small red house number {i}", "sku": f"sku-{i}"} for i in range(PROMPTS)]
    rows[5]["seed"] = 1234
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    done = cli(
        env,
        "submit",
        str(prompts),
        "--model",
        "tiny",
        "--steps",
        "4",
        "--chunk-size",
        "4",
        "--wait",
        "--json",
        "--name",
        "e2e",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["total"] == result["succeeded"] == PROMPTS
    assert result["failed"] == result["queued"] == result["running"] == result["canceled"] == 0
    batch_id = result["batch_id"]
    bucket_prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://")
    bucket, prefix = bucket_prefix.split("/", 1)
    assert result["output"] == f"s3://{bucket}/{prefix}/{batch_id}/"

    # The objects: one PNG per prompt, of the requested size, carrying prompt and seed.
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{batch_id}/")["Contents"]
    # The images; manifest.jsonl joins them once the last worker has written it (test_outputs.py).
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/manifest.jsonl"))
    assert keys == [f"{prefix}/{batch_id}/{i:06d}.png" for i in range(PROMPTS)]
    objects = {}
    for key in keys:
        obj = s3.get_object(Bucket=bucket, Key=key)
        assert obj["ContentType"] == "image/png"
        objects[key] = obj["Body"].read()

    # The rows: all succeeded, each pointing at its object by key and sha256, both workers used.
    engine = create_engine(normalize_url(env["LCMQ_DATABASE_URL"]))
    with engine.connect() as conn:
        jobs = conn.execute(
            text(
                "SELECT index, state, key, sha256, seed, prompt, worker, attempts FROM jobs "
                "WHERE batch_id = :b ORDER BY index"
            ),
            {"b": batch_id},
        ).all()
    engine.dispose()
    assert len(jobs) == PROMPTS
    for job in jobs:
        assert job.state == "succeeded"
        assert job.attempts == 1
        data = objects[f"{prefix}/{job.key}"]  # row keys are relative to the storage URL
        assert hashlib.sha256(data).hexdigest() == job.sha256
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size == (64, 64) and image.mode == "RGB"
        parameters = image.info["parameters"]
        assert parameters.startswith(job.prompt + "\n")
        assert f"Seed: {job.seed}," in parameters and "Steps: 4," in parameters
    assert jobs[5].seed == 1234
    assert len({job.worker for job in jobs}) == 2

    # The manifest: one line per image with its record; status prints the same object as submit.
    manifest = cli(env, "manifest", batch_id)
    assert manifest.returncode == 0, manifest.stderr
    lines = [json.loads(line) for line in manifest.stdout.splitlines()]
    assert [line["index"] for line in lines] == list(range(PROMPTS))
    assert all(REQUIRED_MANIFEST_KEYS <= set(line) for line in lines)
    assert lines[3]["metadata"] == {"sku": "sku-3"} and lines[3]["profile"] == "tiny"
    assert {line["sha256"] for line in lines} == {job.sha256 for job in jobs}
    status = cli(env, "status", batch_id, "--json")
    assert json.loads(status.stdout.strip()) == result
    listing = cli(env, "batches", "--json")
    assert batch_id in [b["batch_id"] for b in json.loads(listing.stdout)]

    # Each worker loaded its pipeline once and then served several chunks with it.
    for worker in workers:
        worker.terminate()
        log = worker.log
        assert log.count("pipeline loaded") == 1, log
        assert log.count("chunk done") >= 2, log
