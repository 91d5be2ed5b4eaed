"""The real diffusers pipeline on the generated tiny model, loaded as real models are."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from helpers import job_record
from PIL import Image

from lcmq.profiles import BUILTIN_PROFILES
from lcmq.repository import JobRecord
from lcmq.settings import get_settings


def _job(index: int, seed: int, prompt: str = "a lighthouse at dusk", **changes) -> JobRecord:
    return job_record(index, seed=seed, prompt=prompt, **changes)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, models_dir):
    import os

    from lcmq.settings import reset_settings
    from worker.pipeline import load_pipeline

    os.environ["LCMQ_MODELS_DIR"] = str(models_dir)
    reset_settings()
    try:
        yield load_pipeline(BUILTIN_PROFILES["tiny"], get_settings())
    finally:
        os.environ.pop("LCMQ_MODELS_DIR", None)
        reset_settings()


def _png(loaded, jobs):
    from worker.encode import encode_png, parameters_text
    from worker.render import render

    images = render(loaded, jobs)
    return [encode_png(image, parameters_text(job, "tiny")) for job, image in zip(jobs, images, strict=True)]


def test_pipeline_is_lcm_with_the_lora_fused(tiny_pipeline):
    from diffusers import LCMScheduler

    pipe = tiny_pipeline.pipe
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert "lcm" in pipe.get_list_adapters()["unet"]
    # fuse_lora merged the adapter into the base weights
    assert any(getattr(m, "merged", False) for m in pipe.unet.modules())


def test_same_job_same_batch_size_gives_same_bytes(tiny_pipeline):
    jobs = [_job(0, seed=11), _job(1, seed=12, prompt="a red fox")]
    first = _png(tiny_pipeline, jobs)
    second = _png(tiny_pipeline, jobs)
    assert first == second
    assert first[0] != first[1]  # different seeds and prompts do give different images


def test_seed_alone_changes_the_image(tiny_pipeline):
    a, b = _png(tiny_pipeline, [_job(0, seed=1), _job(1, seed=2)])
    assert a != b
    assert Image.open(io.BytesIO(a)).size == (64, 64)


def test_guidance_above_one_uses_the_negative_prompt(tiny_pipeline):
    base = _job(0, seed=5, guidance=1.5)
    with_negative = replace(base, negative_prompt="blurry, low quality")
    plain, negated = _png(tiny_pipeline, [base]) + _png(tiny_pipeline, [with_negative])
    assert plain != negated


def test_requested_size_is_rendered(tiny_pipeline):
    (data,) = _png(tiny_pipeline, [_job(0, seed=3, width=96, height=48)])
    assert Image.open(io.BytesIO(data)).size == (96, 48)
