"""One table of job columns (JobRecord's fields) drives the record, the claim's RETURNING, and
the COPY (Postgres) and insert (SQLite) of a new job: it must agree with lcmq.models, and a job
must come back from both databases with every column as it was written."""

from __future__ import annotations

import uuid
from dataclasses import fields

import pytest

from lcmq.migrate import upgrade
from lcmq.models import Job
from lcmq.repository import FROM_BATCH, FROM_ROW, JOB_COLUMNS, NEW_JOB, JobRecord, Repository

# A value for every column a producer's row gives, each one that a careless writer would mangle:
# COPY's escapes in text, unicode, nested JSON, a seed past 32 bits, a float that is not exact.
EVERY_ROW_COLUMN = {
    "prompt": "a fox\tin \\snow\nat night, \u00e9t\u00e9 \U0001f98a",
    "negative_prompt": "blur\r\n",
    "seed": 2**62 + 3,
    "steps": 6,
    "guidance": 1.3,
    "width": 512,
    "height": 768,
    "meta": {"sku": "A-1", "tags": ["x", "y"], "nested": {"n": 1.5, "none": None, "tab": "a\tb"}},
    "key": "catalog/shop/item-1.png",
    "render_key": "f" * 64,
    "loras": [{"name": "ink", "path": "/models/ink.safetensors", "weight": 0.8}],
    "init_image": "s3://bucket/inputs/cat.png",
    "strength": 0.35,
    "control": [
        {
            "name": "edges",
            "type": "controlnet",
            "model": "/m/canny",
            "image": "s3://b/e.png",
            "scale": 0.8,
            "start": 0.0,
        }
    ],
}


def test_the_column_table_and_the_jobs_table_agree():
    names = [f.name for f in fields(JobRecord)]
    table_columns = sorted(column.name for column in Job.__table__.columns)
    assert sorted(column.name for column in JOB_COLUMNS.values()) == table_columns
    assert list(JOB_COLUMNS) == names
    for f in fields(JobRecord):
        column = JOB_COLUMNS[f.name]
        assert column.nullable == ("| None" in str(f.type)), f"{f.name}: nullable, typed {f.type}"
        assert f.metadata in ({}, FROM_ROW, FROM_BATCH), f.name
    # A column a new job cannot leave NULL is written at creation (from the row, the batch or a
    # default): a new NOT NULL column must say where its first value comes from.
    written = set(NEW_JOB.row_fields) | set(NEW_JOB.batch_fields) | set(NEW_JOB.defaults)
    required = {name for name, column in JOB_COLUMNS.items() if not column.nullable and column.server_default is None}
    assert required <= written, required - written
    assert set(NEW_JOB.row_fields) == set(EVERY_ROW_COLUMN) | {"id", "index"}


@pytest.fixture(params=["postgres-copy", "sqlite-insert"])
def repo(request, tmp_path):
    if request.param == "postgres-copy":
        return Repository(request.getfixturevalue("migrated_pg_url"))
    url = f"sqlite:///{tmp_path / 'lcmq.db'}"
    upgrade(url)
    return Repository(url)


def _create(repo: Repository, rows: list[dict]) -> str:
    batch_id = uuid.uuid4().hex[:16]
    repo.create_batch(
        {"id": batch_id, "name": None, "profile": "tiny", "total": 0, "seed": 1, "output": "file:///x/", "options": {}},
        rows,
    )
    return batch_id


def test_a_job_round_trips_with_every_column(repo):
    job_id = uuid.uuid4().hex
    batch_id = _create(repo, [{"id": job_id, "index": 0, **EVERY_ROW_COLUMN}])
    (job,) = repo.jobs(batch_id)
    assert {name: getattr(job, name) for name in EVERY_ROW_COLUMN} == EVERY_ROW_COLUMN
    assert (job.id, job.index, job.batch_id, job.state, job.attempts) == (job_id, 0, batch_id, "queued", 0)
    batch = repo.get_batch(batch_id)
    assert job.created_at == job.dispatched_at == batch.created_at and batch.total == 1
    later = (
        "worker",
        "error",
        "sha256",
        "render_ms",
        "batch_size",
        "warning",
        "started_at",
        "finished_at",
        "lease_until",
    )
    assert all(getattr(job, name) is None for name in later)
    # The claim reads the same table through Core: the same record, now running.
    (claimed,) = repo.claim([job_id], "w", lease_s=60)
    assert {name: getattr(claimed, name) for name in EVERY_ROW_COLUMN} == EVERY_ROW_COLUMN
    assert claimed.created_at == job.created_at and claimed.lease_until > claimed.started_at
    assert list(repo.iter_jobs(batch_id, None)) == repo.jobs(batch_id)


def test_a_row_that_leaves_columns_out_gets_their_defaults(repo):
    row = {
        "id": uuid.uuid4().hex,
        "index": 0,
        "prompt": "p",
        "seed": 1,
        "steps": 4,
        "guidance": 1.0,
        "width": 64,
        "height": 64,
        "meta": {},
    }
    (job,) = repo.jobs(_create(repo, [row]))
    assert job.negative_prompt == "" and job.meta == {}
    assert (job.key, job.render_key, job.loras, job.init_image, job.strength) == (None,) * 5
