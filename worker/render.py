"""Micro-batch rendering: one pipeline call for several jobs of the same render shape."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from lcmq.repository import JobRecord

from worker.pipeline import LoadedPipeline


def micro_batches(jobs: Sequence[JobRecord], batch_size: int) -> Iterator[list[JobRecord]]:
    """Consecutive groups of at most batch_size jobs that share width, height, steps and guidance."""
    by_shape: dict[tuple, list[JobRecord]] = {}
    for job in jobs:
        by_shape.setdefault((job.width, job.height, job.steps, job.guidance), []).append(job)
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def render(loaded: LoadedPipeline, jobs: Sequence[JobRecord]):
    """PIL images for jobs of one shape; each image's noise comes from its own seeded generator."""
    first = jobs[0]
    if loaded.dtype is None:  # the null renderer: no noise, no compute
        return loaded.pipe(prompt=[job.prompt for job in jobs], width=first.width, height=first.height).images
    import torch

    # CPU generators give the same noise on every device: an image depends on its seed alone
    # (and, slightly, on the batch size through kernel choice; the row records it).
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    kwargs = {}
    if first.guidance > 1.0:  # guidance 1.0 disables CFG; the negative prompt has no effect then
        kwargs["negative_prompt"] = [job.negative_prompt for job in jobs]
    with torch.inference_mode():
        result = loaded.pipe(prompt=[job.prompt for job in jobs], num_inference_steps=first.steps,
                             guidance_scale=first.guidance, width=first.width, height=first.height,
                             generator=generators, output_type="pil", **kwargs)
    return result.images
