"""The OpenVINO runtime on the generated tiny model: its first UNet step matches torch's, the
export is cached in the models dir and read by the next load, and the micro-batch loop renders
through it with the same scheduler and seeds.

Tolerance: f32 on both sides (INFERENCE_PRECISION_HINT f32), so the differences are summation
order only: max |ov - torch| <= 1e-4 on outputs of magnitude ~1 (measured ~1e-6). A whole image
is compared more loosely (1/255 per pixel): random weights amplify step-to-step differences.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import job_record

from lcmq.profiles import BUILTIN_PROFILES

TOLERANCE = 1e-4
TINY_OV = replace(BUILTIN_PROFILES["tiny"], runtime="openvino")


@pytest.fixture(scope="module")
def torch_pipeline(models_settings):
    from worker.pipeline import load_pipeline

    return load_pipeline(BUILTIN_PROFILES["tiny"], models_settings)


@pytest.fixture(scope="module")
def ov_pipeline(models_settings):
    from worker.pipeline import load_pipeline

    return load_pipeline(TINY_OV, models_settings)


def _first_step_inputs(pipe):
    """What the pipeline hands its UNet at the first of 4 steps: seeded latents, the first LCM
    timestep, and the prompt's embeddings (from torch's text encoder)."""
    import torch

    pipe.scheduler.set_timesteps(4)
    timestep = pipe.scheduler.timesteps[0]
    generator = torch.Generator("cpu").manual_seed(7)
    latents = torch.randn((2, pipe.unet.config.in_channels, 8, 8), generator=generator)
    ids = pipe.tokenizer(["a lighthouse at dusk", "a red fox"], padding="max_length", return_tensors="pt").input_ids
    return latents, timestep, ids


def test_first_unet_step_text_encoder_and_decoder_match_torch(torch_pipeline, ov_pipeline):
    import torch

    torch_pipe, ov_pipe = torch_pipeline.pipe, ov_pipeline.pipe
    assert ov_pipeline.runtime == "openvino" and type(ov_pipe.unet).__name__ == "OVUNet"
    latents, timestep, ids = _first_step_inputs(torch_pipe)
    with torch.inference_mode():
        embeddings = torch_pipe.text_encoder(ids, return_dict=False)[0]
        expected = torch_pipe.unet(latents, timestep, encoder_hidden_states=embeddings, return_dict=False)[0]
        got = ov_pipe.unet(latents, timestep, encoder_hidden_states=embeddings, return_dict=False)[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= TOLERANCE
        assert expected.abs().max().item() > 0.1  # an output that could differ
        assert (ov_pipe.text_encoder(ids)[0] - embeddings).abs().max().item() <= TOLERANCE
        decoded = torch_pipe.vae.decode(latents, return_dict=False)[0]
        assert (ov_pipe.vae.decode(latents)[0] - decoded).abs().max().item() <= TOLERANCE


def test_the_micro_batch_loop_renders_the_same_images_within_a_pixel_level(torch_pipeline, ov_pipeline):
    import numpy as np

    from worker.render import render

    jobs = [job_record(0, seed=11, prompt="a lighthouse at dusk"), job_record(1, seed=12, prompt="a red fox")]
    expected = [np.asarray(image, dtype=np.int16) for image in render(torch_pipeline, jobs)]
    got = [np.asarray(image, dtype=np.int16) for image in render(ov_pipeline, jobs)]
    assert [g.shape for g in got] == [e.shape for e in expected] == [(64, 64, 3)] * 2
    assert max(int(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True)) <= 1
    assert not np.array_equal(got[0], got[1])  # seeds and prompts still make the difference


def test_the_export_is_cached_under_the_profile_and_versions_and_read_by_the_next_load(models_settings, ov_pipeline):
    from worker.openvino_runtime import PARTS, export_key, library_versions, use_openvino
    from worker.pipeline import load_pipeline

    folder = models_settings.models_path / "openvino" / export_key(TINY_OV, library_versions())
    files = sorted(f"{part}.{ext}" for part in PARTS for ext in ("bin", "xml"))
    assert sorted(p.name for p in folder.iterdir()) == files
    # Another profile's fields or another library version: another folder.
    assert export_key(replace(TINY_OV, lcm_lora="other"), library_versions()) != folder.name
    assert export_key(TINY_OV, library_versions() | {"openvino": "0"}) != folder.name
    again = load_pipeline(BUILTIN_PROFILES["tiny"], models_settings).pipe  # a torch pipeline, as step 5 gets it
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    second = use_openvino(again, TINY_OV, models_settings.models_path, threads=1)
    assert (second.exported, second.export_s, second.folder) == (False, 0.0, folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
