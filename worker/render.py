"""Micro-batch rendering: one pipeline call for several jobs of the same render shape (size,
steps, guidance, style LoRA set, img2img strength, control set: lcmq.spec.render_shape)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lcmq.loras import lora_key
from lcmq.repository import JobRecord
from lcmq.settings import get_settings
from lcmq.spec import render_shape
from worker.adapters import adapter_cache
from worker.control import call_images, control_cache, plan_call
from worker.img2img import img2img_pipeline
from worker.memory import slice_vae
from worker.pipeline import LoadedPipeline


def job_shape(job: JobRecord) -> tuple:
    return render_shape(job.width, job.height, job.steps, job.guidance, job.loras, job.strength, job.control)


def micro_batches(jobs: Sequence[JobRecord], batch_size: int) -> Iterator[list[JobRecord]]:
    """Consecutive groups of at most batch_size jobs that share a render shape."""
    by_shape: dict[tuple, list[JobRecord]] = {}
    for job in jobs:
        by_shape.setdefault(job_shape(job), []).append(job)
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def render(
    loaded: LoadedPipeline,
    jobs: Sequence[JobRecord],
    init_images: Sequence | None = None,
    control_images: Sequence[Sequence] | None = None,
):
    """PIL images for jobs of one shape; each image's noise comes from its own seeded generator.
    With init_images (one per job, already fitted to the size: worker.img2img) it is img2img;
    with control_images (per job, one per control of the shared set: worker.control) the call
    runs the set's ControlNets or T2I-Adapters."""
    first = jobs[0]
    if loaded.dtype is None:  # the null renderer: no noise, no compute
        return loaded.pipe(prompt=[job.prompt for job in jobs], width=first.width, height=first.height).images
    import torch

    # CPU generators give the same noise on every device: an image depends on its seed alone
    # (and, slightly, on the batch size through kernel choice; the row records it).
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    kwargs: dict[str, Any] = {}
    if first.guidance > 1.0:  # guidance 1.0 disables CFG; the negative prompt has no effect then
        kwargs["negative_prompt"] = [job.negative_prompt for job in jobs]
    settings = get_settings()
    pipe = loaded.pipe
    if init_images is not None:
        kwargs |= {"image": list(init_images), "strength": first.strength}
        if not first.control:
            pipe = img2img_pipeline(loaded.pipe)
    else:
        kwargs |= {"width": first.width, "height": first.height}
    controls = control_cache(loaded.pipe, settings, loaded.device, loaded.dtype)
    cache = adapter_cache(loaded.pipe, settings)
    # The adapter set and the call that uses it, as one step (a threads pool shares the pipeline).
    with cache.lock, controls.lock, torch.inference_mode():
        if first.control and control_images is not None:
            call = plan_call(loaded.profile.family, first.control, img2img=init_images is not None)
            pipe = controls.pipeline(call, first.control)
            # img2img's own image is `image`; a control pipeline's is `image` without img2img.
            images = call_images(control_images, first.control[0]["type"])
            kwargs |= call.kwargs | {("control_image" if init_images is not None else "image"): images}
        if loaded.runtime == "torch":
            cache.activate(first.loras)
        elif lora_key(first.loras) != lora_key(
            loaded.profile.loras
        ):  # refused at submit: the export holds the profile's
            raise ValueError(f"runtime {loaded.runtime} renders the profile's style LoRAs only")
        slice_vae(loaded, len(jobs))  # the VAE is shared by the img2img and control pipelines
        result = pipe(
            prompt=[job.prompt for job in jobs],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=generators,
            output_type="pil",
            **kwargs,
        )
    return result.images
