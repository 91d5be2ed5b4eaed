"""A submit in three phases (scheduler.batches): check and stage, write, publish. Embedded
(SQLite, filesystem broker and storage): what a refused, a failed and a repeated submit leave
behind when a row names a local init image. An unwritable storage folder stands in for S3 down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def api(embedded_env):
    import lcmq
    from lcmq.migrate import upgrade
    from lcmq.settings import get_settings

    upgrade(get_settings().database_url_resolved)
    return lcmq


def _renders(env) -> Path:
    return Path(env["LCMQ_STORAGE_URL"].removeprefix("file://"))


def _batch_file(folder: Path, *rows: dict) -> Path:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "cat.png")
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _queued_messages(settings) -> list[Path]:
    broker = settings.broker_folder
    return [p for p in broker.rglob("*") if p.is_file()] if broker.exists() else []


CAT = {"prompt": "a cat", "init_image": "cat.png", "strength": 0.5}


def test_a_bad_row_is_named_before_any_init_image_is_stored(api, embedded_env, tmp_path):
    from lcmq.errors import InputError

    _renders(embedded_env).write_text("a file where the storage folder should be")  # storage is down
    path = _batch_file(tmp_path, CAT, {"prompt": "a dog", "steps": 0})
    with pytest.raises(InputError) as info:  # the user's mistake, not the storage outage
        api.submit(path, model="tiny")
    assert (info.value.line, info.value.field) == (2, "steps")
    assert api.batches() == []


def test_a_refused_batch_leaves_the_storage_untouched(api, embedded_env, tmp_path):
    from lcmq.errors import InputError

    path = _batch_file(tmp_path, CAT, {"prompt": "a dog", "steps": 0})
    with pytest.raises(InputError):
        api.submit(path, model="tiny")
    renders = _renders(embedded_env)
    assert not renders.exists() or list(renders.iterdir()) == []  # no file, and no batch folder


def test_a_failed_upload_writes_nothing(api, embedded_env, tmp_path):
    from lcmq.errors import StorageError
    from lcmq.settings import get_settings

    _renders(embedded_env).write_text("a file where the storage folder should be")
    with pytest.raises(StorageError):
        api.submit(_batch_file(tmp_path, {"prompt": "a dog"}, CAT), model="tiny")
    assert api.batches() == [] and _queued_messages(get_settings()) == []


def test_an_identical_resubmit_stores_no_second_input(api, embedded_env, tmp_path):
    path = _batch_file(tmp_path, CAT, {"prompt": "a dog"})
    first = api.submit(path, model="tiny")
    again = api.submit(path, model="tiny")
    assert again.batch_id == first.batch_id and len(api.batches()) == 1
    stored = [p.relative_to(_renders(embedded_env)) for p in _renders(embedded_env).rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].parts[:2] == (first.batch_id, "inputs")


def test_a_connection_lost_at_commit_keeps_the_inputs_a_committed_batch_may_need(
    api, embedded_env, tmp_path, monkeypatch
):
    """A commit whose reply never came may have committed: deleting the inputs would fail its jobs."""
    from lcmq.errors import DatabaseError
    from lcmq.repository import Repository

    committed = Repository.create_batch

    def commits_then_loses_the_connection(self, *args, **kwargs):  # a fault we cannot cause otherwise
        committed(self, *args, **kwargs)
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr(Repository, "create_batch", commits_then_loses_the_connection)
    with pytest.raises(DatabaseError):
        api.submit(_batch_file(tmp_path, CAT), model="tiny")
    (batch,) = api.batches()
    (job,) = api.jobs(batch["batch_id"])
    stored = Path(job["init_image"].removeprefix("file://")) if "init_image" in job else None
    inputs = list((_renders(embedded_env) / batch["batch_id"] / "inputs").glob("*"))
    assert len(inputs) == 1, "the committed batch's init image was deleted"
    assert stored is None or stored == inputs[0]
