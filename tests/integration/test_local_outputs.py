"""A finished batch in the embedded default (SQLite, a local folder): the modes of the files lcmq
writes (images, manifest.jsonl, both export formats), and the errors the real `lcmq` command
reports for it. Jobs are recorded through the repository the way a worker records them; no worker
process runs, since neither the pixels nor the queue matter here."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest
from helpers import create_test_batch

from lcmq import api
from lcmq.manifest import write_manifest
from lcmq.migrate import upgrade
from lcmq.repository import StoredImage
from lcmq.settings import get_settings
from lcmq.storage import sha256_hex

IMAGES = 3


def _finished_batch() -> str:
    """A batch of IMAGES succeeded png jobs, each image stored under its key."""
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url_resolved)
    repo, store = api.repository(settings), api.storage(settings)
    batch_id = uuid.uuid4().hex[:16]
    options = {"model": "null", "image_format": "png"}
    _, job_ids = create_test_batch(
        repo,
        IMAGES,
        profile="null",
        output=store.batch_url(batch_id),
        options=options,
        ids_from_batch=True,
        batch_id=batch_id,
    )
    repo.claim(job_ids, "w", lease_s=60)
    stored = []
    for index, job_id in enumerate(job_ids):
        key, data = store.batch_key(batch_id, index), f"image {index}".encode()
        store.put(key, data, "image/png", {})
        stored.append(StoredImage(job_id, key, sha256_hex(data), 1.0, 1))
    assert repo.record_successes(stored, "w") == IMAGES
    return batch_id


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def file_mode(request):
    """Run under a umask; the mode a file written under it must have (0644, 0640)."""
    old = os.umask(request.param)
    yield 0o666 & ~request.param
    os.umask(old)


def test_images_manifest_and_exports_are_readable_by_the_umask(embedded_env, tmp_path, file_mode):
    batch_id = _finished_batch()
    settings = get_settings()
    assert write_manifest(api.repository(settings), api.storage(settings), batch_id)
    renders = tmp_path / "renders" / batch_id
    assert _modes(renders) == {f"{i:06d}.png": file_mode for i in range(IMAGES)} | {"manifest.jsonl": file_mode}

    api.export(batch_id, format="imagefolder", to=tmp_path / "folder")
    assert _modes(tmp_path / "folder") == {f"{i:06d}.png": file_mode for i in range(IMAGES)} | {
        "metadata.jsonl": file_mode,
        "export.json": file_mode,
    }
    api.export(batch_id, format="webdataset", to=tmp_path / "shards", shard_size=2)
    assert _modes(tmp_path / "shards") == {
        "shard-000000.tar": file_mode,
        "shard-000001.tar": file_mode,
        "export.json": file_mode,
    }


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_export_of_a_batch_with_a_missing_image_names_it(embedded_env, cli, tmp_path, fmt):
    batch_id = _finished_batch()
    missing = tmp_path / "renders" / batch_id / "000001.png"
    missing.unlink()
    done = cli(embedded_env, "export", batch_id, "--format", fmt, "--to", str(tmp_path / "out"), timeout_s=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("lcmq: error: ") and "Traceback" not in done.stderr
    assert f"{missing.as_uri()}: the image of job {batch_id}{1:016x} (row 1) is missing" in done.stderr
    assert not (tmp_path / "out" / "export.json").exists()  # an export that stopped never looks complete


def test_an_unknown_batch_has_its_own_exit_code(embedded_env, cli):
    get_settings().home.mkdir(parents=True, exist_ok=True)
    upgrade(get_settings().database_url_resolved)
    done = cli(embedded_env, "status", "nosuchbatch", timeout_s=120)
    assert (done.returncode, done.stderr) == (3, "lcmq: error: no batch 'nosuchbatch'\n")


def test_an_unreadable_file_is_a_message_and_a_traceback_only_in_debug(embedded_env, cli, tmp_path):
    """A file of the user's that lcmq cannot read (here lcmq.toml is a folder) is an OSError: one line
    naming the file, exit 1; the traceback shows only with LCMQ_LOG_LEVEL=DEBUG."""
    config = tmp_path / "lcmq.toml"
    config.mkdir()
    done = cli(embedded_env, "batches", timeout_s=120)
    assert (done.returncode, done.stderr) == (1, f"lcmq: error: {config}: Is a directory\n")
    debug = cli(embedded_env | {"LCMQ_LOG_LEVEL": "DEBUG"}, "batches", timeout_s=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "IsADirectoryError" in debug.stderr
    assert debug.stderr.endswith(f"lcmq: error: {config}: Is a directory\n")
