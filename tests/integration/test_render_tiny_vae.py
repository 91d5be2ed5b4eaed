"""The generated tiny model with its generated AutoencoderTiny, loaded the worker's way: the tiny
VAE replaces the whole VAE, decodes other pixels than the full one from the same latents, and
the VAE decodes in slices only in calls above the size --max-memory found to need it."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from helpers import job_record

from lcmq.profiles import BUILTIN_PROFILES
from lcmq.settings import get_settings, reset_settings

TINY_VAE = "lcmq-generated:tiny-sd15-taesd"


@pytest.fixture(scope="module")
def pipelines(models_dir):
    from worker.pipeline import load_pipeline

    os.environ["LCMQ_MODELS_DIR"] = str(models_dir)
    reset_settings()
    try:
        tiny = BUILTIN_PROFILES["tiny"]
        fast = replace(tiny, name="tiny-fast", vae_decoder="tiny", tiny_vae=TINY_VAE)
        yield load_pipeline(tiny, get_settings()), load_pipeline(fast, get_settings())
    finally:
        os.environ.pop("LCMQ_MODELS_DIR", None)
        reset_settings()


def test_the_tiny_vae_replaces_the_whole_vae(pipelines, models_dir):
    from diffusers import AutoencoderKL, AutoencoderTiny

    full, fast = pipelines
    assert isinstance(fast.pipe.vae, AutoencoderTiny) and isinstance(full.pipe.vae, AutoencoderKL)
    assert not [c for c in fast.pipe.components.values() if isinstance(c, AutoencoderKL)]
    assert fast.pipe.vae_scale_factor == full.pipe.vae_scale_factor == 2  # the same latent grid
    assert (models_dir / "tiny-sd15-taesd" / "config.json").exists()  # generated once, beside the model


def test_the_tiny_vae_decodes_other_pixels_from_the_same_seed(pipelines):
    import numpy as np

    from worker.render import render

    full, fast = pipelines
    jobs = [job_record(0, seed=3), job_record(1, seed=4)]
    full_images, fast_images = render(full, jobs), render(fast, jobs)
    assert [im.size for im in fast_images] == [(64, 64)] * 2
    assert render(fast, jobs)[0].tobytes() == fast_images[0].tobytes()  # deterministic
    for a, b in zip(full_images, fast_images, strict=True):
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_the_vae_is_sliced_only_above_the_size_that_fits_whole(pipelines):
    from worker.render import render

    _, fast = pipelines
    try:
        fast.vae_slicing_above = 1
        render(fast, [job_record(0), job_record(1)])
        assert fast.pipe.vae.use_slicing
        render(fast, [job_record(0)])
        assert not fast.pipe.vae.use_slicing
    finally:
        fast.vae_slicing_above = None
        fast.pipe.vae.disable_slicing()
