"""Phase 1 of a submit, check and stage, has no effect outside the process: rows name where
their local init images will be stored, and only the write's `upload` stores them."""

from __future__ import annotations

from lcmq.profiles import get_profile
from lcmq.spec import BatchOptions, JobSpec
from lcmq.storage import FileStorage, file_sha256
from scheduler.batches import derive_seed, stage_batch


def _spec(index: int, init_image: str) -> JobSpec:
    return JobSpec(
        index=index,
        prompt=f"a cat {index}",
        negative_prompt="",
        seed=None,
        steps=4,
        guidance=1.0,
        width=64,
        height=64,
        init_image=init_image,
        strength=0.5,
        upload_init=True,
    )


def test_staging_names_the_inputs_and_stores_nothing(tmp_path):
    storage = FileStorage(tmp_path / "renders")
    cat = tmp_path / "cat.PNG"
    cat.write_bytes(b"not really a png")
    staged = stage_batch(
        [_spec(i, cat.as_uri()) for i in range(3)],
        get_profile("tiny"),
        BatchOptions(model="tiny", seed=7),
        storage,
        idempotency_key="k",
        priority=2,
    )
    rows = list(staged.jobs)

    key = f"{staged.batch_id}/inputs/{file_sha256(cat)[:16]}.png"
    assert [row["init_image"] for row in rows] == [storage.url(key)] * 3
    assert [row["seed"] for row in rows] == [derive_seed(7, i) for i in range(3)]
    assert (staged.batch["seed"], staged.batch["idempotency_key"], staged.batch["priority"]) == (7, "k", 2)
    assert [job_id for _, ids in staged.pending.chunks(2) for job_id in ids] == [row["id"] for row in rows]
    assert [len(ids) for _, ids in staged.pending.chunks(2)] == [2, 1]  # one shape: chunks in row order
    assert not (tmp_path / "renders").exists()  # staged, not stored

    staged.inputs.upload()  # the write does this once every row has passed
    assert storage.list_keys(staged.batch_id) == [key] and storage.get(key) == b"not really a png"
    staged.inputs.discard()  # ... and this when the batch was not written after all
    assert storage.list_keys(staged.batch_id) == []


def test_kept_pending_chunks_by_shape_in_row_order_and_gives_up_past_its_limit():
    from scheduler.batches import KeptPending, job_id

    kept = KeptPending("b" * 16, limit=4)
    for index, shape in enumerate(["s", "s", "t", "s", "t"]):
        kept.add(index, (shape,))
    assert list(kept.chunks(2)) == [
        ("b" * 16, [job_id("b" * 16, 0), job_id("b" * 16, 1)]),
        ("b" * 16, [job_id("b" * 16, 3)]),
        ("b" * 16, [job_id("b" * 16, 2), job_id("b" * 16, 4)]),
    ]
    kept.add(5, ("s",))  # a fifth run: past the limit, the batch is read back instead
    assert kept.runs is None
