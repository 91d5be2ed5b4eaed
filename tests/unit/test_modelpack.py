"""The pushed-model contract without services: manifest format, locations, cache paths, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcmq.errors import ProfileError
from lcmq.modelpack import (
    MANIFEST_FILE,
    ManifestFile,
    ModelFetchError,
    ModelManifest,
    build_manifest,
    local_files,
    locate,
    manifest_digest,
    parse_manifest,
    profile_model_urls,
    push_destination,
    pushed_url,
)
from lcmq.profiles import Profile, preflight
from lcmq.storage import file_sha256
from worker.model_fetch import Fetched, cache_entry, cache_summary, check_file, intact, lock_path

SHA = "ab" * 32


def model_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "weights.safetensors").write_bytes(b"\x00" * 100)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("hub download state")
    (folder / ".lcmq-complete").write_text("ok\n")
    return folder


def test_a_folder_manifest_lists_every_visible_file_with_size_and_sha256(tmp_path):
    folder = model_folder(tmp_path)
    manifest, files = build_manifest("shop-v3", folder)
    assert manifest.kind == "folder" and manifest.name == "shop-v3"
    assert [f.path for f in manifest.files] == ["model_index.json", "unet/weights.safetensors"]
    weights = manifest.file("unet/weights.safetensors")
    assert weights == ManifestFile("unet/weights.safetensors", 100, file_sha256(folder / "unet/weights.safetensors"))
    assert [path for _, path in files] == [folder / "model_index.json", folder / "unet/weights.safetensors"]


def test_the_manifest_round_trips_with_its_format_and_version(tmp_path):
    manifest, _ = build_manifest("m", model_folder(tmp_path))
    raw = manifest.to_bytes()
    body = json.loads(raw)
    assert body["format"] == "lcmq-model" and body["version"] == 1
    assert parse_manifest(raw, "s3://b/m/") == manifest
    assert manifest_digest(raw) == manifest_digest(manifest.to_bytes())  # stable bytes: a stable cache key


def test_a_single_file_push_names_the_file(tmp_path):
    checkpoint = tmp_path / "anime-v3.safetensors"
    checkpoint.write_bytes(b"weights")
    manifest, _ = build_manifest("anime", checkpoint)
    assert manifest.kind == "file" and [f.path for f in manifest.files] == ["anime-v3.safetensors"]
    assert pushed_url("b", "root/models/anime/", manifest) == "s3://b/root/models/anime/anime-v3.safetensors"


@pytest.mark.parametrize(
    "body, names",
    [
        ({"format": "other"}, "format"),
        ({"version": 9}, "version 9"),
        ({"kind": "zip"}, "kind"),
        ({"files": []}, "files"),
        ({"files": [{"path": "../etc/passwd", "size": 1, "sha256": SHA}]}, "../etc/passwd"),
        ({"files": [{"path": "/abs", "size": 1, "sha256": SHA}]}, "/abs"),
        ({"files": [{"path": "a.bin", "size": -1, "sha256": SHA}]}, "a.bin: size"),
        ({"files": [{"path": "a.bin", "size": 1, "sha256": "xyz"}]}, "a.bin: sha256"),
        ({"files": [{"path": "a.bin", "size": 1, "sha256": SHA}] * 2}, "twice"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_field(body, names):
    good = {"format": "lcmq-model", "version": 1, "name": "m", "kind": "folder"}
    good["files"] = [{"path": "a.bin", "size": 1, "sha256": SHA}]
    with pytest.raises(ModelFetchError, match=rf"s3://b/m/: {MANIFEST_FILE}: .*{__import__('re').escape(names)}"):
        parse_manifest(json.dumps(good | body).encode(), "s3://b/m/")


def test_not_json_is_refused():
    with pytest.raises(ModelFetchError, match="not JSON"):
        parse_manifest(b"<html>", "s3://b/m/")


def test_locations_of_a_folder_and_of_a_single_file():
    folder = locate("s3://bucket/root/models/shop/")
    assert (folder.bucket, folder.prefix, folder.file) == ("bucket", "root/models/shop", None)
    assert folder.manifest_url == f"s3://bucket/root/models/shop/{MANIFEST_FILE}"
    assert locate("s3://bucket/root/models/shop").prefix == "root/models/shop"  # the slash is optional
    single = locate("s3://bucket/models/anime/anime-v3.safetensors")
    assert (single.prefix, single.file) == ("models/anime", "anime-v3.safetensors")
    assert single.manifest_url == f"s3://bucket/models/anime/{MANIFEST_FILE}"
    for bad in ("s3://bucket", "s3://bucket/", "s3:///models/x/", "https://x/models/"):
        with pytest.raises(ProfileError, match="s3://bucket/prefix/"):
            locate(bad)


def test_hidden_and_unsafe_file_names(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a weird name.bin").write_bytes(b"x")
    with pytest.raises(ModelFetchError, match="a weird name.bin"):
        local_files(folder)
    with pytest.raises(ProfileError, match="no such file"):
        local_files(tmp_path / "missing")


def test_push_destination_defaults_under_the_storage_root():
    assert push_destination("shop", None, "s3://bucket/farm") == ("bucket", "farm/models/shop")
    assert push_destination("shop", "s3://other/pre/fix/", "s3://bucket/farm") == ("other", "pre/fix")
    with pytest.raises(ProfileError, match="--to"):
        push_destination("shop", None, "file://renders")
    with pytest.raises(ProfileError, match="--to"):
        push_destination("shop", "s3://bucket/", "file://renders")
    with pytest.raises(ProfileError, match="model name"):
        push_destination("../up", None, "s3://bucket/farm")


def test_the_cache_entry_is_keyed_by_the_prefix_url_and_the_manifest(tmp_path):
    folder, single = locate("s3://b/models/m/"), locate("s3://b/models/m/m.safetensors")
    entry = cache_entry(tmp_path, folder, "1" * 64)
    assert entry == cache_entry(tmp_path, single, "1" * 64)  # one push, one entry
    assert entry != cache_entry(tmp_path, folder, "2" * 64)  # pushed again: a new entry
    assert entry != cache_entry(tmp_path, locate("s3://b/models/n/"), "1" * 64)
    assert entry.parent == tmp_path / "remote" and lock_path(entry).name == entry.name + ".lock"


def test_a_file_that_does_not_match_its_manifest_is_named(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"0123")
    check_file("s3://b/m/", ManifestFile("unet/w.bin", 4, file_sha256(path)), path)
    with pytest.raises(ModelFetchError, match=r"s3://b/m/: unet/w.bin: 4 bytes, the manifest says 5"):
        check_file("s3://b/m/", ManifestFile("unet/w.bin", 5, file_sha256(path)), path)
    with pytest.raises(ModelFetchError, match=r"s3://b/m/: unet/w.bin: sha256 .* does not match"):
        check_file("s3://b/m/", ManifestFile("unet/w.bin", 4, SHA), path)


def test_an_entry_with_a_file_gone_is_not_intact(tmp_path):
    manifest = ModelManifest("m", "folder", (ManifestFile("a.bin", 2, SHA), ManifestFile("b/c.bin", 1, SHA)))
    (tmp_path / "b").mkdir()
    (tmp_path / "a.bin").write_bytes(b"xx")
    assert not intact(tmp_path, manifest)
    (tmp_path / "b" / "c.bin").write_bytes(b"x")
    assert intact(tmp_path, manifest)


def test_the_cache_summary_of_a_load():
    def fetched(outcome):
        return Fetched("s3://b/m/", Path("/x"), outcome, 0.1)

    assert cache_summary([]) is None
    assert cache_summary([fetched("hit"), fetched("hit")]) == "hit"
    assert cache_summary([fetched("miss")]) == "miss"
    assert cache_summary([fetched("miss"), fetched("hit")]) == "partial"


def test_preflight_takes_s3_models_and_names_a_malformed_one():
    ok = Profile("p", "sd15", "s3://b/models/base/", "s3://b/models/lcm/pytorch_lora_weights.safetensors")
    preflight(ok, "cpu")
    single = Profile("p", "sd15", "s3://b/models/anime/anime.safetensors", "s3://b/lcm/", config="s3://b/cfg/")
    preflight(single, "cpu")
    with pytest.raises(ProfileError, match="profile 'p': lcm_lora .*s3://b/"):
        preflight(Profile("p", "sd15", "s3://b/models/base/", "s3://b/"), "cpu")


def test_the_models_a_profile_names_are_its_s3_fields_and_style_loras_only():
    """What the gateway presigns for a token's profile (403 for anything else)."""
    profile = Profile(
        "p",
        "sd15",
        "s3://b/models/base/",
        "s3://b/models/lcm/pytorch_lora_weights.safetensors",
        vae="/local/vae",
        loras=(
            {"name": "ink", "path": "s3://b/models/ink/", "weight": 0.8},
            {"name": "oil", "path": "/x.safetensors", "weight": 1.0},
        ),
    )
    assert profile_model_urls(profile) == {
        "s3://b/models/base/",
        "s3://b/models/lcm/pytorch_lora_weights.safetensors",
        "s3://b/models/ink/",
    }
    assert profile_model_urls(Profile("q", "sd15", "/models/base", "/models/lcm")) == set()
