"""Producer and worker helpers that need no services: seeds, chunking, micro-batches, encoding."""

from __future__ import annotations

import io
from dataclasses import replace

from helpers import job_record
from PIL import Image

from lcmq.repository import JobRecord, PendingJob
from lcmq.spec import JobSpec
from scheduler.batches import derive_seed, job_row
from scheduler.dispatch import chunk_pending
from worker.encode import encode_png, parameters_text
from worker.render import micro_batches


def _spec(index: int, **changes) -> JobSpec:
    return replace(
        JobSpec(
            index=index, prompt=f"p{index}", negative_prompt="", seed=None, steps=4, guidance=1.0, width=64, height=64
        ),
        **changes,
    )


def test_derived_seeds_are_stable_distinct_and_stored():
    assert derive_seed(7, 0) == derive_seed(7, 0)
    assert len({derive_seed(7, i) for i in range(1000)}) == 1000
    assert derive_seed(7, 0) != derive_seed(8, 0)
    assert job_row("j", _spec(3), batch_seed=7)["seed"] == derive_seed(7, 3)
    assert job_row("j", _spec(3, seed=42), batch_seed=7)["seed"] == 42


def test_chunks_hold_one_batch_and_render_shape_and_respect_the_size():
    jobs = [
        PendingJob(f"j{i}", "b1" if i < 8 else "b2", _spec(i, steps=4 if i % 3 else 6).render_shape, 0)
        for i in range(10)
    ]
    chunks = chunk_pending(jobs, 3)
    shapes = {job.id: (job.batch_id, job.shape) for job in jobs}
    assert sorted(j for _, chunk in chunks for j in chunk) == sorted(job.id for job in jobs)
    assert all(len(chunk) <= 3 and len({shapes[j] for j in chunk}) == 1 for _, chunk in chunks)
    assert all(shapes[chunk[0]][0] == batch_id for batch_id, chunk in chunks)


def test_retried_jobs_travel_alone():
    jobs = [PendingJob(f"j{i}", "b", (64, 64, 4, 1.0), attempts=1 if i in (2, 5) else 0) for i in range(6)]
    chunks = [ids for _, ids in chunk_pending(jobs, 8)]
    assert ["j2"] in chunks and ["j5"] in chunks
    assert ["j0", "j1", "j3", "j4"] in chunks


def _record(index: int, **changes) -> JobRecord:
    return job_record(index, prompt="a ünïcode prompt", **changes)


def test_micro_batches_split_by_shape_and_size():
    jobs = [_record(i, width=64 if i < 5 else 128) for i in range(8)]
    groups = list(micro_batches(jobs, 2))
    assert [len(g) for g in groups] == [2, 2, 1, 2, 1]
    assert all(len({j.width for j in g}) == 1 for g in groups)


def test_png_carries_parameters_and_is_reproducible():
    job = _record(3, negative_prompt="blurry", guidance=1.5)
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    text = parameters_text(job, "tiny")
    assert text == (
        "a ünïcode prompt\nNegative prompt: blurry\n"
        "Steps: 4, Sampler: LCM, CFG scale: 1.5, Seed: 3, Size: 64x64, Model: tiny"
    )
    data = encode_png(image, text)
    assert data == encode_png(image, text)
    assert Image.open(io.BytesIO(data)).info["parameters"] == text
