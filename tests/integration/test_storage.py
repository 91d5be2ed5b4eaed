"""Storage against moto's real S3 server and a local folder."""

from __future__ import annotations

import uuid

import pytest

from lcmq.errors import PermanentStorageError, StorageError
from lcmq.storage import FileStorage, S3Storage, storage_from_url

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
