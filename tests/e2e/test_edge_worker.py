"""The acceptance of edge workers: a Celery worker (with the farm's credentials) and an edge
worker (with a gateway URL and a token, nothing else) render one batch together to moto S3,
through a real `lcmq api` as the gateway."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
from PIL import Image
from support.api_server import start_api
from support.edge import SECRET_PREFIXES, edge_env, start_edge, worker_token

from bench.harness import done, outcome, wait_until, worker_node, write_prompts
from lcmq import api


def test_a_celery_worker_and_an_edge_worker_render_one_batch(isolated_env, procs, cli, tmp_path):
    gateway = start_api(procs, isolated_env)
    token = worker_token("rented")
    env = edge_env(isolated_env, tmp_path / "rented-box")
    assert not any(key.startswith(SECRET_PREFIXES) for key in env)  # no database, broker or bucket
    # A token for another profile is refused at hello: exit 1, the reason, never the token.
    other = worker_token("other", profiles="sd15")
    refused = cli(env, "worker", "--model", "tiny", "--gateway", gateway.url, "--token", other, timeout_s=120)
    assert refused.returncode == 1 and "may not serve profile 'tiny'" in refused.stderr, refused.stderr[-2000:]
    assert other not in refused.stderr + refused.stdout
    edge = start_edge(procs, env, gateway.url, token, "box1")
    celery = procs(isolated_env, "worker", "--model", "tiny")
    edge.wait_ready(), celery.wait_ready()
    batch_id = api.submit(write_prompts(tmp_path / "p.jsonl", 24), model="tiny", width=128, height=128).batch_id

    wait_until(lambda: done(batch_id), 120, interval_s=0.2, what=f"batch {batch_id} to finish")
    wait_until(lambda: api.repository().get_batch(batch_id).manifest_at is not None, 30, what="the manifest")
    result = outcome(batch_id)  # rows, objects and manifest agree
    assert (result.lost, result.duplicates, result.stuck, result.mismatched) == (0, 0, 0, 0), result.line()
    assert result.succeeded == 24 and result.max_attempts == 1, result.line()  # every job exactly once
    by_worker = {j.worker for j in api.repository().jobs(batch_id)}
    assert by_worker == {"edge/rented/box1", worker_node(celery)}, by_worker
    # The edge process was given no secret, and made no local database of its own either.
    assert edge.alive() and not (tmp_path / "rented-box" / ".lcmq" / "lcmq.db").exists()
    assert token not in edge.log

    # Inputs through presigned GETs: a style LoRA and an init image in the bucket, the edge worker alone.
    celery.kill()
    _edge_reads_its_inputs_through_presigned_urls(isolated_env, tmp_path, token)
    assert token not in edge.log


def _edge_reads_its_inputs_through_presigned_urls(env, tmp_path, token):
    from worker.generated import ensure_generated, generate_style_lora

    bucket, prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    model_dir, _ = ensure_generated("tiny-sd15", Path(env["LCMQ_MODELS_DIR"]))
    oil = generate_style_lora(model_dir, tmp_path / "oil.safetensors", seed=12)
    s3.upload_file(str(oil), bucket, f"{prefix}-in/oil.safetensors")
    gray = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(gray, format="PNG")
    s3.put_object(Bucket=bucket, Key=f"{prefix}-in/gray.png", Body=gray.getvalue())
    oil_url, init_url = f"s3://{bucket}/{prefix}-in/oil.safetensors", f"s3://{bucket}/{prefix}-in/gray.png"
    rows = [
        {"prompt": "a lighthouse", "seed": 7},
        {"prompt": "a lighthouse", "seed": 7, "loras": [{"name": "oil", "path": oil_url, "weight": 0.8}]},
        {"prompt": "a lighthouse", "seed": 7, "loras": [{"name": "oil", "path": oil_url, "weight": 0.8}]},
        {"prompt": "a lighthouse", "seed": 3, "init_image": init_url, "strength": 0.5},
    ]
    path = tmp_path / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch_id = api.submit(path, model="tiny").batch_id
    wait_until(lambda: done(batch_id), 120, interval_s=0.2, what=f"batch {batch_id} to finish")
    jobs = api.repository().jobs(batch_id)
    assert [(j.state, j.worker, j.error) for j in jobs] == [("succeeded", "edge/rented/box1", None)] * 4
    assert jobs[1].sha256 == jobs[2].sha256 != jobs[0].sha256  # the style applied, the same way twice
