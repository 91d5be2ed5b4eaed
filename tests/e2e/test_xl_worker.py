"""The SDXL family end to end: CLI → Redis → a real `lcmq worker --model tiny-xl` → S3 → Postgres,
with a memory budget (the worker probes its batch size at start and reports peak memory)."""

from __future__ import annotations

import io
import json
import re

import boto3
from PIL import Image

PROMPTS = ["a lighthouse at dusk", "a red fox in the snow", "a bowl of ramen", "a sailing boat", "a city at night"]


def test_tiny_xl_renders_through_a_worker_with_a_memory_budget(services_env, procs, cli, tmp_path):
    env = services_env
    worker = procs(env, "worker", "--model", "tiny-xl", "--batch-size", "2", "--max-memory", "64GiB")
    worker.wait_ready()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    done = cli(
        env, "submit", str(prompts), "--model", "tiny-xl", "--seed", "7", "--chunk-size", "5", "--wait", "--json"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["total"] == result["succeeded"] == len(PROMPTS), result

    bucket, prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{result['batch_id']}/")["Contents"]
    keys = sorted(o["Key"] for o in listed if o["Key"].endswith(".png"))
    assert len(keys) == len(PROMPTS)
    images = set()
    for key in keys:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size == (64, 64) and image.mode == "RGB"
        assert "Steps: 4," in image.info["parameters"]
        images.add(data)
    assert len(images) == len(PROMPTS)

    worker.terminate()
    log = worker.log
    assert "pipeline loaded" in log and "pipeline=StableDiffusionXLPipeline" in log, log
    # The probe kept the configured batch size (a 64 GiB budget fits it), measuring 1 then 2.
    assert re.search(r"batch size chosen .*batch_size=2 .*peaks_mb=1:[\d.]+,2:[\d.]+", log), log
    chunk = re.search(r"chunk done .*batch_size=2 render_peak_mb=([\d.]+)", log)
    assert chunk and float(chunk.group(1)) > 0, log
