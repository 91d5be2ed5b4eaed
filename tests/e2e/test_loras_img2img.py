"""Style LoRAs and img2img end to end: CLI (--lora, rows' loras / init_image / strength) → Redis
→ a real `lcmq worker` on tiny and on tiny-xl (the SDXL family) → S3 (moto) → Postgres. One
worker serves both batches of a model."""

from __future__ import annotations

import io
import json

import boto3
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from lcmq.repository import normalize_url


def _jobs(env, batch_id):
    engine = create_engine(normalize_url(env["LCMQ_DATABASE_URL"]))
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT index, state, key, sha256, error, loras, init_image, strength, batch_size "
                "FROM jobs WHERE batch_id = :b ORDER BY index"
            ),
            {"b": batch_id},
        ).all()
    engine.dispose()
    return rows


def _submit(env, cli, path, model, *flags):
    done = cli(env, "submit", str(path), "--model", model, "--chunk-size", "8", "--wait", "--json", *flags)
    assert done.returncode in (0, 1), done.stderr  # 1: some job failed, which these batches mean to
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pixels(s3, bucket, prefix, key):
    data = s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize(("model", "generated"), [("tiny", "tiny-sd15"), ("tiny-xl", "tiny-sdxl")])
def test_style_loras_and_img2img_render_through_a_worker(
    services_env, procs, cli, tmp_path, models_dir, model, generated
):
    from worker.generated import ensure_generated, generate_style_lora

    env = services_env
    worker = procs(env, "worker", "--model", model, "--batch-size", "4")
    bucket, prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")

    # Two styles for the model; "oil" is read from S3 by the worker (downloaded into its cache).
    model_dir, _ = ensure_generated(generated, models_dir)
    ink = generate_style_lora(model_dir, tmp_path / "ink.safetensors", seed=11)
    oil = generate_style_lora(model_dir, tmp_path / "oil.safetensors", seed=12)
    s3.upload_file(str(oil), bucket, f"{prefix}-{model}/oil.safetensors")
    oil_url = f"s3://{bucket}/{prefix}-{model}/oil.safetensors"
    (tmp_path / "broken.safetensors").write_text("not a LoRA")
    worker.wait_ready()

    # --- style LoRAs: the batch's --lora, rows' own sets, a repeat, none, and a broken file ---
    rows = [
        {"prompt": "a lighthouse", "seed": 7},  # the batch's set: ink 0.8
        {"prompt": "a lighthouse", "seed": 7, "loras": [{"name": "ink", "path": "ink.safetensors", "weight": 0.4}]},
        {
            "prompt": "a lighthouse",
            "seed": 7,
            "loras": [
                {"name": "oil", "path": oil_url, "weight": 0.8},
                {"name": "ink", "path": "ink.safetensors", "weight": 0.3},
            ],
        },
        {"prompt": "a lighthouse", "seed": 7},  # row 0 again
        {"prompt": "a lighthouse", "seed": 7, "loras": []},  # no style
        {"prompt": "a lighthouse", "seed": 7, "loras": [{"name": "bad", "path": "broken.safetensors"}]},
    ]
    batch_file = tmp_path / "styles.jsonl"
    batch_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _submit(env, cli, batch_file, model, "--lora", f"ink={ink}:0.8")
    assert (result["succeeded"], result["failed"]) == (5, 1), result
    jobs = _jobs(env, result["batch_id"])
    assert [j.state for j in jobs] == ["succeeded"] * 5 + ["failed"]
    assert "LoraLoadError" in jobs[5].error and "broken.safetensors" in jobs[5].error
    assert jobs[0].loras == [{"name": "ink", "path": str(ink), "weight": 0.8}] and jobs[4].loras is None
    sha = [j.sha256 for j in jobs]
    assert sha[0] == sha[3]  # the same parameters twice: the same bytes
    assert len({sha[0], sha[1], sha[2], sha[4]}) == 4  # weight, set, or no style: other pixels
    assert jobs[0].batch_size == jobs[3].batch_size == 2  # one set, one call (the set is the shape)

    # --- img2img from an init image in S3: strength 0.3 stays nearer to it than 0.8 ---------
    gray = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(gray, format="PNG")
    s3.put_object(Bucket=bucket, Key=f"{prefix}-{model}/gray.png", Body=gray.getvalue())
    s3.put_object(Bucket=bucket, Key=f"{prefix}-{model}/junk.png", Body=b"\x89PNG but not an image")
    Image.new("RGB", (96, 48), (20, 120, 220)).save(tmp_path / "local.png")  # uploaded at submit
    init = f"s3://{bucket}/{prefix}-{model}/gray.png"
    rows = [
        {"prompt": "a lighthouse", "seed": 3, "init_image": init, "strength": 0.3},
        {"prompt": "a lighthouse", "seed": 3, "init_image": init, "strength": 0.8},
        {
            "prompt": "a lighthouse",
            "seed": 3,
            "init_image": f"s3://{bucket}/{prefix}-{model}/junk.png",
            "strength": 0.3,
        },  # the same micro-batch as row 0: only this job fails
        {"prompt": "a lighthouse", "seed": 3, "init_image": "local.png", "strength": 0.5},
        {"prompt": "a lighthouse", "seed": 3},
    ]
    batch_file = tmp_path / "img2img.jsonl"
    batch_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _submit(env, cli, batch_file, model, "--steps", "4")
    jobs = _jobs(env, result["batch_id"])
    assert [j.state for j in jobs] == ["succeeded", "succeeded", "failed", "succeeded", "succeeded"], jobs
    assert "InitImageError" in jobs[2].error and "not a readable image" in jobs[2].error
    assert f"{prefix}-{model}/junk.png" in jobs[2].error and "BytesIO" not in jobs[2].error  # names the file
    assert jobs[3].init_image.startswith(f"s3://{bucket}/{prefix}/{result['batch_id']}/inputs/")
    assert jobs[4].init_image is None and jobs[4].strength is None
    target = np.full((64, 64, 3), 128, dtype=np.float32)
    low, high = (np.abs(_pixels(s3, bucket, prefix, jobs[i].key) - target).mean() for i in (0, 1))
    assert low < high, (low, high)
    assert jobs[0].sha256 != jobs[1].sha256
    manifest = [json.loads(line) for line in cli(env, "manifest", result["batch_id"]).stdout.splitlines()]
    assert [(m["index"], m.get("strength")) for m in manifest] == [(0, 0.3), (1, 0.8), (3, 0.5), (4, None)]
    worker.terminate()
    assert worker.log.count("pipeline loaded") == 1
