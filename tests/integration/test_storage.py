"""Storage against moto's real S3 server and a local folder."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from lcmq.errors import ConfigError, MissingObjectError, PermanentStorageError, StorageError
from lcmq.storage import FileStorage, S3Storage, read_url, storage_from_url

BUCKET = "lcmq-test"


def test_s3_put_get_list(s3_endpoint):
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    store = storage_from_url(f"s3://{BUCKET}/{prefix}", s3_endpoint)
    assert isinstance(store, S3Storage)
    key = store.batch_key("b1", 7)
    assert key == "b1/000007.png"
    store.put(key, b"png-bytes", "image/png", {"sha256": "x"})
    assert store.exists(key) and not store.exists("b1/000008.png")
    assert store.get(key) == b"png-bytes"
    assert store.list_keys("b1") == ["b1/000007.png"]
    assert store.url(key) == f"s3://{BUCKET}/{prefix}/b1/000007.png"
    assert store.batch_url("b1") == f"s3://{BUCKET}/{prefix}/b1/"
    head = store.client.head_object(Bucket=BUCKET, Key=f"{prefix}/{key}")
    assert head["ContentType"] == "image/png" and head["Metadata"] == {"sha256": "x"}


def test_s3_missing_bucket_is_permanent(s3_endpoint):
    store = storage_from_url("s3://no-such-bucket/x", s3_endpoint)
    with pytest.raises(PermanentStorageError, match="NoSuchBucket"):
        store.put("b/000000.png", b"x", "image/png", {})


def test_s3_unreachable_is_transient():
    store = storage_from_url("s3://bucket/x", "http://127.0.0.1:9")  # nothing listens on port 9
    store.client.meta.config.retries["max_attempts"] = 0
    with pytest.raises(StorageError):
        store.put("b/000000.png", b"x", "image/png", {})


def test_file_storage_is_confined_to_its_root(tmp_path):
    store = FileStorage(tmp_path / "root")
    store.put("b/000001.png", b"data", "image/png", {})
    assert (tmp_path / "root" / "b" / "000001.png").read_bytes() == b"data"
    assert store.list_keys("b") == ["b/000001.png"]
    for bad in ("../escape.png", "/etc/passwd", "b/../../x", "b//x", "b/./x", "b\\x", "b/x?y"):
        with pytest.raises(PermanentStorageError):
            store.put(bad, b"x", "image/png", {})
    assert not (tmp_path / "escape.png").exists()


def test_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = storage_from_url("file://renders")
    assert relative.url("b/000000.png") == (tmp_path / "renders" / "b" / "000000.png").as_uri()
    absolute = storage_from_url(f"file://{tmp_path}/out")
    assert absolute.batch_url("b") == (tmp_path / "out" / "b").as_uri() + "/"


def test_put_file_and_listing_the_whole_root(s3_endpoint, tmp_path):
    """put_file stores a local file whole (manifests, shards); "" lists everything (exports)."""
    source = tmp_path / "manifest.jsonl"
    source.write_text('{"index": 0}\n')
    s3 = storage_from_url(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:6]}", s3_endpoint)
    local = FileStorage(tmp_path / "root")
    for store in (s3, local):
        assert store.list_keys("") == []
        store.put_file(store.manifest_key("b1"), source, "application/x-ndjson")
        store.put("b1/000000.png", b"png", "image/png", {})
        assert store.manifest_key("b1") == "b1/manifest.jsonl"
        assert store.get("b1/manifest.jsonl") == b'{"index": 0}\n'
        assert store.list_keys("") == ["b1/000000.png", "b1/manifest.jsonl"]
    head = s3.client.head_object(Bucket=BUCKET, Key=f"{s3.prefix}/b1/manifest.jsonl")
    assert head["ContentType"] == "application/x-ndjson"
    assert sorted(p.name for p in (tmp_path / "root" / "b1").iterdir()) == ["000000.png", "manifest.jsonl"]
    with pytest.raises(PermanentStorageError, match="NoSuchBucket"):
        storage_from_url("s3://no-such-bucket/x", s3_endpoint).put_file("b/manifest.jsonl", source, "x")


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def file_mode(request):
    """Run under a umask; the mode a file written under it must have (0644, 0640)."""
    old = os.umask(request.param)
    yield 0o666 & ~request.param
    os.umask(old)


def test_stored_files_get_the_umask_mode(tmp_path, file_mode):
    """A web server or training job of another user reads the images, manifests and exports: files
    get 0666 less the umask, as any program's, not tempfile's 0600."""
    source = tmp_path / "manifest.jsonl"
    source.write_text('{"index": 0}\n')
    store = FileStorage(tmp_path / "root")
    store.put("b1/000000.png", b"png", "image/png", {})
    store.put_file("b1/manifest.jsonl", source, "application/x-ndjson")
    store.put("b1/000000.png", b"png again", "image/png", {})  # replacing keeps the mode too
    for name in ("000000.png", "manifest.jsonl"):
        assert stat.S_IMODE((tmp_path / "root" / "b1" / name).stat().st_mode) == file_mode, name
    assert sorted(p.name for p in (tmp_path / "root" / "b1").iterdir()) == ["000000.png", "manifest.jsonl"]


def test_file_storage_reading_errors_are_lcmq_errors(tmp_path):
    """A missing or unreadable object is a storage error naming it, never a bare OSError."""
    store = FileStorage(tmp_path / "root")
    with pytest.raises(MissingObjectError, match="b1/000003.png"):
        store.get("b1/000003.png")
    assert store.stored_sha256("b1/000003.png") is None
    store.delete("b1/000003.png")  # nothing there: no error
    store.put("b1/000000.png/x", b"x", "image/png", {})  # 000000.png is a folder now
    with pytest.raises(PermanentStorageError, match="000000.png"):
        store.get("b1/000000.png")
    with pytest.raises(PermanentStorageError, match="000000.png"):
        store.delete("b1/000000.png")
    with pytest.raises(MissingObjectError, match="nothing.csv"):
        read_url(f"file://{tmp_path}/nothing.csv")


def test_s3_missing_object_is_its_own_error(s3_endpoint):
    store = storage_from_url(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:6]}", s3_endpoint)
    with pytest.raises(MissingObjectError, match="NoSuchKey"):
        store.get("b1/000003.png")
    assert not store.exists("b1/000003.png") and store.stored_sha256("b1/000003.png") is None
    with pytest.raises(PermanentStorageError, match="NoSuchBucket") as refused:
        storage_from_url("s3://no-such-bucket/x", s3_endpoint).get("b1/000003.png")
    assert not isinstance(refused.value, MissingObjectError)  # a missing bucket is a setup error


def test_a_malformed_s3_endpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="not a url"):
        storage_from_url("s3://bucket/x", "not a url")
