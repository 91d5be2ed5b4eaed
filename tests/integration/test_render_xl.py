"""The real diffusers pipeline on `tiny-xl` (SDXL family), single-file twins, VAEs and memory modes.

Same pattern as test_render.py: generated models loaded the way real ones are, real rendering.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace

import pytest
from helpers import job_record
from PIL import Image

from lcmq.profiles import BUILTIN_PROFILES, GENERATED_PREFIX
from lcmq.settings import Settings


@pytest.fixture(scope="module")
def tiny_xl(models_settings):
    from worker.pipeline import load_pipeline

    return load_pipeline(BUILTIN_PROFILES["tiny-xl"], models_settings)


def _jobs():
    return [
        job_record(0, seed=11),
        job_record(1, seed=12, prompt="a red fox"),
        job_record(2, seed=13, guidance=1.5, negative_prompt="blurry"),
    ]


def _png(loaded, jobs, profile: str = "tiny-xl") -> list[bytes]:
    from worker.encode import encode_png, parameters_text
    from worker.render import micro_batches, render

    out = []
    for group in micro_batches(jobs, 4):  # guidance > 1 is its own micro-batch, as in a worker
        images = render(loaded, group)
        out += [encode_png(image, parameters_text(job, profile)) for job, image in zip(group, images, strict=True)]
    return out


def _state_equal(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tiny-xl ------------------------------------------------------------------------------------


def test_tiny_xl_is_an_sdxl_pipeline_with_the_lcm_lora_fused(tiny_xl):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = tiny_xl.pipe
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert "lcm" in pipe.get_list_adapters()["unet"]
    assert any(getattr(m, "merged", False) for m in pipe.unet.modules())


def test_tiny_xl_same_jobs_give_same_bytes(tiny_xl):
    first, second = _png(tiny_xl, _jobs()), _png(tiny_xl, _jobs())
    assert first == second
    assert len(set(first)) == 3  # seeds, prompts and guidance all change the image
    for data in first:
        image = Image.open(io.BytesIO(data))
        assert image.size == (64, 64) and image.mode == "RGB"


def test_tiny_xl_renders_the_requested_size(tiny_xl):
    (data,) = _png(tiny_xl, [job_record(0, seed=3, width=96, height=48)])
    assert Image.open(io.BytesIO(data)).size == (96, 48)


def test_the_vae_option_replaces_the_base_vae(tiny_xl, models_settings):
    """`vae` loads a separate AutoencoderKL folder (here tiny-xl's second, differently seeded VAE)."""
    from diffusers import AutoencoderKL

    from worker.pipeline import _resolve, load_pipeline

    vae_ref = GENERATED_PREFIX + "tiny-sdxl-vae"
    swapped = load_pipeline(replace(BUILTIN_PROFILES["tiny-xl"], vae=vae_ref), models_settings)
    assert _state_equal(swapped.pipe.vae, AutoencoderKL.from_pretrained(_resolve(vae_ref, models_settings)))
    assert not _state_equal(swapped.pipe.vae, tiny_xl.pipe.vae)
    assert _state_equal(swapped.pipe.unet, tiny_xl.pipe.unet)
    jobs = [job_record(0, seed=21)]
    assert _png(swapped, jobs) != _png(tiny_xl, jobs)
    assert _png(swapped, jobs) == _png(swapped, jobs)


# --- single-file checkpoints ----------------------------------------------------------------------


def test_a_single_file_twin_renders_the_same_bytes(models_settings, tmp_path):
    """The tiny model written as one original-layout .safetensors and loaded with from_single_file
    (config = the generated folder) is the same pipeline: same weights, same images."""
    from pathlib import Path

    from support.single_file import save_sd15_single_file

    from worker.pipeline import _resolve, load_pipeline

    tiny = BUILTIN_PROFILES["tiny"]
    checkpoint = save_sd15_single_file(Path(_resolve(tiny.base, models_settings)), tmp_path / "tiny-tune.safetensors")
    twin = replace(tiny, name="tiny-single", base=str(checkpoint), config=tiny.base)
    folder, single = load_pipeline(tiny, models_settings), load_pipeline(twin, models_settings)
    for component in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(folder.pipe, component), getattr(single.pipe, component)), component
    jobs = _jobs()
    assert _png(single, jobs, "tiny") == _png(folder, jobs, "tiny")


def test_the_single_file_layout_is_the_original_one(models_settings, tmp_path):
    from pathlib import Path

    from safetensors import safe_open
    from support.single_file import save_sd15_single_file

    from worker.pipeline import _resolve

    path = save_sd15_single_file(
        Path(_resolve(BUILTIN_PROFILES["tiny"].base, models_settings)), tmp_path / "t.safetensors"
    )
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert (
        "model.diffusion_model.input_blocks.0.0.weight" in keys
        and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    )


def test_worker_start_refuses_a_missing_checkpoint_or_config(embedded_env, cli, tmp_path):
    checkpoint = tmp_path / "gone.safetensors"
    config = tmp_path / "lcmq.toml"
    config.write_text(
        f'[profiles.tune]\nfamily = "sd15"\nbase = "{checkpoint}"\nconfig = "{GENERATED_PREFIX}tiny-sd15"\n'
        f'lcm_lora = "{GENERATED_PREFIX}tiny-sd15-lcm-lora"\n'
    )
    run = cli(embedded_env, "worker", "--model", "tune")
    assert run.returncode == 1
    assert f"lcmq: error: profile 'tune': base path {checkpoint} does not exist" in run.stderr
    checkpoint.write_bytes(b"x")
    config.write_text(f'[profiles.tune]\nfamily = "sd15"\nbase = "{checkpoint}"\n')
    run = cli(embedded_env, "worker", "--model", "tune")
    assert run.returncode == 1 and "profile 'tune': base" in run.stderr and "needs config =" in run.stderr


def test_float16_on_an_explicit_cpu_device_stops_the_worker_start(embedded_env, cli):
    # The built-ins are dtype "auto" (float32 on the CPU); an explicit float16 cannot run there.
    with open(embedded_env["LCMQ_CONFIG"], "a") as config:
        config.write('[profiles.sd15]\ndtype = "float16"\n')
    run = cli(embedded_env, "worker", "--model", "sd15", "--device", "cpu")
    assert run.returncode == 1
    assert "profile 'sd15': dtype float16 cannot run on the CPU device" in run.stderr


# --- memory modes and the memory budget -------------------------------------------------------------


def test_memory_modes_are_applied_and_offload_ignored_on_cpu(models_settings, caplog):
    from worker.pipeline import load_pipeline

    profile = replace(
        BUILTIN_PROFILES["tiny-xl"], attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=True
    )
    with caplog.at_level(logging.WARNING, logger="lcmq.worker"):
        loaded = load_pipeline(profile, models_settings)
    assert loaded.pipe.vae.use_slicing and loaded.pipe.vae.use_tiling
    processors = {type(p).__name__ for p in loaded.pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    assert any("cpu_offload ignored" in getattr(r, "warning", "") for r in caplog.records)
    assert loaded.device == "cpu" and loaded.pipe.device.type == "cpu"
    (data,) = _png(loaded, [job_record(0, seed=5)])
    assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_peak_memory_is_measured_on_cpu(tiny_xl):
    from worker.memory import PeakMemory
    from worker.render import render

    with PeakMemory("cpu") as peak:
        render(tiny_xl, [job_record(0)])
    assert peak.mb is not None and peak.mb > 50  # the process, weights and libraries included


@pytest.mark.parametrize(("budget_mb", "expected"), [(1, 1), (10**6, 4)])
def test_the_memory_budget_picks_the_batch_size(models_settings, budget_mb, expected, caplog):
    """A budget below any render keeps batch size 1 (with a warning); a large one keeps all 4."""
    from worker.pipeline import load_pipeline

    budgeted = Settings(**(models_settings.model_dump() | {"max_memory_mb": budget_mb, "batch_size": 4}))
    with caplog.at_level(logging.INFO, logger="lcmq.worker"):
        loaded = load_pipeline(BUILTIN_PROFILES["tiny"], budgeted)
    assert loaded.batch_size == expected
    (record,) = [r for r in caplog.records if r.message.startswith("batch size")]
    assert record.batch_size == expected and record.budget_mb == budget_mb
    measured = [int(part.split(":")[0]) for part in record.peaks_mb.split(",")]
    assert measured == ([1] if expected == 1 else [1, 2, 4])
