"""Submitting style LoRAs and init images against Postgres (COPY), Redis and S3, no worker: what
is stored, what the dispatcher sees, and that a refused batch leaves no uploaded input behind."""

from __future__ import annotations

import json

import boto3
import pytest
from PIL import Image


def _objects(env) -> list[str]:
    bucket, prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]


def test_loras_and_init_images_are_stored_and_shape_the_chunks(services_env, tmp_path):
    import lcmq
    from lcmq.api import repository
    from lcmq.models import JobState

    (tmp_path / "ink.safetensors").write_bytes(b"x")
    Image.new("RGB", (64, 64)).save(tmp_path / "cat.png")
    ink = {"name": "ink", "path": "ink.safetensors", "weight": 0.5}
    rows = [
        {"prompt": "a", "loras": [ink]},
        {"prompt": "b", "loras": [ink]},
        {"prompt": "c"},
        {"prompt": "d", "init_image": "cat.png", "strength": 0.5},
        {"prompt": "e", "init_image": "cat.png", "strength": 0.5},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = lcmq.submit(path, model="tiny")
    jobs = repository().jobs(batch.batch_id)
    assert jobs[0].loras == [{"name": "ink", "path": str(tmp_path / "ink.safetensors"), "weight": 0.5}]
    assert jobs[2].loras is None and jobs[2].init_image is None and jobs[2].strength is None
    # One upload for the two rows that name the same file, under the batch's prefix.
    assert jobs[3].init_image == jobs[4].init_image
    inputs = [k for k in _objects(services_env) if f"/{batch.batch_id}/inputs/" in k]
    assert len(inputs) == 1 and jobs[3].init_image.endswith(inputs[0]) and inputs[0].endswith(".png")
    # The dispatcher's view (what a resume or the sweeper chunks by) carries the set and strength.
    repo = repository()
    repo.requeue(batch.batch_id, [JobState.queued])
    shapes = {job.id: job.shape for job in repo.pending_dispatch(batch_id=batch.batch_id)}
    assert shapes[jobs[0].id] == shapes[jobs[1].id] != shapes[jobs[2].id] != shapes[jobs[3].id]
    assert shapes[jobs[3].id][-2] == 0.5 and shapes[jobs[2].id][-3:] == ("", None, "")  # no controls: ""


def test_a_refused_batch_leaves_no_uploaded_init_image(services_env, snapshot, tmp_path):
    import lcmq
    from lcmq.errors import InputError

    Image.new("RGB", (64, 64)).save(tmp_path / "cat.png")
    path = tmp_path / "batch.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "init_image": "cat.png"})
        + "\n"
        + json.dumps({"prompt": "b", "loras": [{"name": "ink", "path": "gone.safetensors"}]})
        + "\n"
    )
    before = snapshot()
    with pytest.raises(InputError) as info:
        lcmq.submit(path, model="tiny")
    assert (info.value.line, info.value.field) == (2, "loras") and "no such file" in info.value.message
    assert snapshot() == before
    assert _objects(services_env) == []
