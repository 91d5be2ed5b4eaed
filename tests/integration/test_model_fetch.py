"""`lcmq models push` to moto's S3 and the worker's fetcher reading it back: verified, cached once
per host, shared between processes, and a corrupted object refused with nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from lcmq.modelpack import MANIFEST_FILE, ManifestMissingError, ModelFetchError, locate
from lcmq.settings import get_settings
from lcmq.storage import file_sha256
from worker.model_fetch import REMOTE_DIR, S3Source, fetch_model

UNET = "unet/diffusion_pytorch_model.safetensors"

# A process of its own that fetches a model and prints what it found (`outcome`, `waited_s`).
FETCH_SCRIPT = """
import json, sys
from pathlib import Path
from lcmq.settings import get_settings
from worker.model_fetch import S3Source, fetch_model
fetched = fetch_model(sys.argv[1], Path(sys.argv[2]), S3Source(get_settings()))
print(json.dumps({"outcome": fetched.outcome, "waited_s": fetched.waited_s, "path": str(fetched.path)}))
"""


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """The generated tiny SD1.5 model and its LCM-LoRA (built once here, a few seconds)."""
    from worker.generated import ensure_generated

    return ensure_generated("tiny-sd15", tmp_path_factory.mktemp("generated"))


def s3(env):
    return boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")


def push(cli, env, name: str, source: Path, *extra: str) -> str:
    done = cli(env, "models", "push", name, str(source), *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_push_writes_every_file_and_a_manifest_that_matches_them(services_env, cli, tiny_folders):
    model_dir, _ = tiny_folders
    url = push(cli, services_env, "tiny-base", model_dir)
    assert url == f"{services_env['LCMQ_STORAGE_URL']}/models/tiny-base/"
    location = locate(url)
    client = s3(services_env)
    listed = client.list_objects_v2(Bucket=location.bucket, Prefix=location.prefix + "/")["Contents"]
    objects = {o["Key"].removeprefix(location.prefix + "/"): o["Size"] for o in listed}
    manifest = json.loads(client.get_object(Bucket=location.bucket, Key=location.key(MANIFEST_FILE))["Body"].read())
    assert manifest["version"] == 1 and manifest["kind"] == "folder" and manifest["name"] == "tiny-base"
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) | {MANIFEST_FILE} == set(objects)
    assert UNET in files and "model_index.json" in files
    for path, entry in files.items():
        assert entry["size"] == objects[path] == (model_dir / path).stat().st_size
        assert entry["sha256"] == file_sha256(model_dir / path)


def test_a_single_file_push_prints_the_file_url_and_json(services_env, cli, tiny_folders, tmp_path):
    _, lora_dir = tiny_folders
    lora = lora_dir / "pytorch_lora_weights.safetensors"
    to = f"{services_env['LCMQ_STORAGE_URL']}/elsewhere/lcm/"
    done = cli(services_env, "models", "push", "tiny-lcm", str(lora), "--to", to, "--json")
    assert done.returncode == 0, done.stderr
    pushed = json.loads(done.stdout)
    assert pushed["url"] == to + "pytorch_lora_weights.safetensors"
    assert (pushed["kind"], pushed["files"], pushed["bytes"]) == ("file", 1, lora.stat().st_size)
    fetched = fetch_model(pushed["url"], tmp_path / "models", S3Source(get_settings()))
    assert fetched.outcome == "miss" and fetched.path.name == "pytorch_lora_weights.safetensors"
    assert file_sha256(fetched.path) == file_sha256(lora)


def test_push_mistakes_are_named_without_a_traceback(services_env, cli, tmp_path):
    missing = cli(services_env, "models", "push", "x", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "nope: no such file or folder" in missing.stderr
    assert "Traceback" not in missing.stderr
    local = cli(services_env | {"LCMQ_STORAGE_URL": "file:///tmp/r"}, "models", "push", "x", str(tmp_path))
    assert local.returncode == 1 and "--to s3://bucket/prefix/" in local.stderr


def test_fetch_downloads_once_then_hits_and_two_processes_share_one_download(services_env, cli, tiny_folders, tmp_path):
    model_dir, _ = tiny_folders
    url = push(cli, services_env, "tiny-shared", model_dir)
    models = tmp_path / "models"

    # Two processes on an empty cache at once: one downloads, the other waits for it and hits.
    children = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_SCRIPT, url, str(models)], env=services_env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [json.loads(child.communicate(timeout=60)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert sorted(r["outcome"] for r in results) == ["hit", "miss"]
    assert results[0]["path"] == results[1]["path"]
    entry = Path(results[0]["path"])
    assert file_sha256(entry / UNET) == file_sha256(model_dir / UNET)
    # One entry, its lock, and no temporary folder left.
    assert sorted(p.name for p in (models / REMOTE_DIR).iterdir()) == [entry.name, entry.name + ".lock"]

    again = fetch_model(url, models, S3Source(get_settings()))
    assert (again.outcome, again.path) == ("hit", entry)


def test_a_corrupted_object_is_refused_naming_the_file_and_nothing_is_kept(services_env, cli, tiny_folders, tmp_path):
    model_dir, _ = tiny_folders
    url = push(cli, services_env, "tiny-corrupt", model_dir)
    location = locate(url)
    client = s3(services_env)
    # The same size, one byte changed: only the sha256 can tell.
    data = bytearray(client.get_object(Bucket=location.bucket, Key=location.key(UNET))["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=location.bucket, Key=location.key(UNET), Body=bytes(data))

    models = tmp_path / "models"
    with pytest.raises(ModelFetchError, match=rf"{url}: {UNET}: sha256 .* does not match the manifest"):
        fetch_model(url, models, S3Source(get_settings()))
    left = [p.name for p in (models / REMOTE_DIR).iterdir()]
    assert len(left) == 1 and left[0].endswith(".lock"), left  # no entry, no temporary folder

    # A truncated object: its size already disagrees.
    client.put_object(Bucket=location.bucket, Key=location.key(UNET), Body=bytes(data[:100]))
    with pytest.raises(ModelFetchError, match=rf"{UNET}: 100 bytes, the manifest says {len(data)}"):
        fetch_model(url, models, S3Source(get_settings()))


def test_a_prefix_without_a_manifest_is_refused(services_env):
    url = f"{services_env['LCMQ_STORAGE_URL']}/models/never-pushed/"
    with pytest.raises(ManifestMissingError, match=f"no {MANIFEST_FILE} at .*never-pushed/{MANIFEST_FILE}"):
        fetch_model(url, Path("/nonexistent-models-dir"), S3Source(get_settings()))
