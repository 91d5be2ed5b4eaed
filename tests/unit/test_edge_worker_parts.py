"""The edge worker's pieces that need no gateway: backoff, what a claim becomes, the CLI's refusals."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from lcmq.cli import main
from worker.encode import encode_job, read_parameters
from worker.gateway_client import BACKOFF_MAX_S, backoff_s, batch_of, job_of, shown_url

EDGE_JOB = {
    "job_id": "j1",
    "batch_id": "b1",
    "index": 3,
    "prompt": "a red house",
    "negative_prompt": "",
    "seed": 7,
    "steps": 2,
    "guidance": 1.0,
    "width": 64,
    "height": 48,
    "metadata": {"k": "v"},
    "attempts": 1,
    "strength": None,
    "render_key": None,
    "loras": [{"name": "ink", "weight": 0.5, "url": "https://s3.example/b/ink.safetensors?X-Amz-Signature=abc"}],
    "init_image_url": "https://s3.example/b/init.png?X-Amz-Signature=def",
    "output": {"format": "webp", "quality": 80},
    "key": "b1/000003.webp",
    "upload": {"method": "PUT", "url": "https://s3.example/b/b1/000003.webp?sig", "headers": {}},
}


def test_backoff_is_jittered_and_capped():
    random.seed(3)
    delays = [backoff_s(attempt) for attempt in range(30) for _ in range(20)]
    assert max(delays) <= BACKOFF_MAX_S and len(set(delays)) > 100


def test_a_claimed_job_becomes_the_render_loops_job_without_signatures_in_its_names():
    job, batch = job_of(EDGE_JOB, "edge/t/n"), batch_of(EDGE_JOB, "tiny")
    assert (job.id, job.key, job.worker, job.width, job.height) == ("j1", "b1/000003.webp", "edge/t/n", 64, 48)
    assert job.init_image == "https://s3.example/b/init.png" == shown_url(EDGE_JOB["init_image_url"])
    assert job.loras == [{"name": "ink", "weight": 0.5, "path": EDGE_JOB["loras"][0]["url"]}]
    data, content_type, ext = encode_job(Image.new("RGB", (64, 48)), job, batch)  # in the batch's format
    assert (content_type, ext) == ("image/webp", "webp")
    assert "Seed: 7" in (read_parameters(data) or "") and "Model: tiny" in (read_parameters(data) or "")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--gateway", "http://127.0.0.1:9"], "--token"),
        (["--token", "lcmqw_x"], "--gateway"),
        (["--gateway", "ftp://farm", "--token", "lcmqw_x"], "--gateway"),
        (["--gateway", "http://127.0.0.1:9", "--token", "lcmqw_x", "--concurrency", "2"], "--concurrency"),
        (["--gateway", "http://127.0.0.1:9", "--token", "lcmqw_x", "--name", "a b"], "--name"),
    ],
)
def test_edge_flags_mistakes_name_the_flag(flags, named, capsys):
    assert main(["worker", "--model", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and "lcmqw_x" not in err
