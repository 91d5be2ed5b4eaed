"""Dataset outputs end to end: image formats, manifest.jsonl, exports.

One `null` worker process serves the whole module (the image does not matter there, so no
model is loaded); `tiny` renders once, for real pixels in WebP. The module has a Postgres
database, a Redis and an S3 prefix of its own, so the sweeper it runs sees only its batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
import uuid

import boto3
import pytest
from PIL import Image

from bench.harness import Process, RedisServer, create_database, wait_until

pytestmark = pytest.mark.services

BUCKET = "lcmq-test"
PG_ADMIN_URL = os.environ.get("LCMQ_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class World:
    def __init__(self, env: dict[str, str], prefix: str, worker: Process):
        self.env, self.prefix, self.worker = env, prefix, worker
        self.s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")

    def object(self, key: str) -> dict:
        """The S3 object at a storage key (relative to LCMQ_STORAGE_URL)."""
        return self.s3.get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")

    def keys(self, batch_id: str) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{self.prefix}/{batch_id}/").get("Contents", [])
        return sorted(o["Key"].removeprefix(f"{self.prefix}/") for o in listed)


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_endpoint, models_dir):
    from lcmq.migrate import upgrade
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    work = tmp_path_factory.mktemp("outputs")
    try:
        db_url, drop_db = create_database(PG_ADMIN_URL)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    upgrade(db_url)
    redis = RedisServer(work / "redis").start()
    prefix = f"out-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCMQ_")} | {
        "LCMQ_HOME": str(work / ".lcmq"),
        "LCMQ_DATABASE_URL": db_url,
        "LCMQ_BROKER_URL": redis.url,
        "LCMQ_STORAGE_URL": f"s3://{BUCKET}/{prefix}",
        "LCMQ_S3_ENDPOINT_URL": s3_endpoint,
        "LCMQ_MODELS_DIR": str(models_dir),
        "LCMQ_CONFIG": str(work / "lcmq.toml"),
        "LCMQ_POLL_S": "0.1",
        "LCMQ_TORCH_THREADS": "1",
        "LCMQ_CHUNK_SIZE": "4",
        "LCMQ_BATCH_SIZE": "2",
        "LCMQ_LEASE_S": "3",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # `datasets` must never reach for the hub; its cache stays in the test's folder.
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(work / "hf"),
    }
    patch = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("LCMQ_")]:
        patch.delenv(key)
    for key, value in env.items():
        patch.setenv(key, value)
    reset_settings()
    get_app.cache_clear()
    worker = Process(env, work / "worker-null.log", "worker", "--model", "null").wait_ready()
    try:
        yield World(env, prefix, worker)
    finally:
        worker.kill()
        worker.close()
        patch.undo()
        reset_settings()
        get_app.cache_clear()
        redis.stop()
        drop_db()


def _run(cli, world: World, *args: str) -> str:
    result = cli(world.env, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _manifest_file(world: World, batch_id: str) -> str:
    return world.object(f"{batch_id}/manifest.jsonl")["Body"].read().decode()


def _manifest_written(batch_id: str, after=None):
    from lcmq import api

    def written():
        at = api.repository().get_batch(batch_id).manifest_at
        return at is not None and (after is None or at > after) and at

    return wait_until(written, 30, interval_s=0.1, what=f"manifest of {batch_id}")


def _check_manifest(world: World, cli, batch_id: str, via_cli: bool = True) -> list[dict]:
    """manifest.jsonl == `lcmq manifest` output (or, to spare a subprocess, the lines it prints
    from the API's records), and its records are the succeeded rows."""
    from lcmq import api
    from lcmq.manifest import line
    from lcmq.models import JobState

    stored = _manifest_file(world, batch_id)
    if via_cli:
        assert stored == _run(cli, world, "manifest", batch_id)
    else:
        assert stored == "".join(line(record) + "\n" for record in api.manifest(batch_id))
    records = [json.loads(line) for line in stored.splitlines()]
    rows = api.repository().jobs(batch_id, JobState.succeeded)
    assert [(r["index"], r["key"], r["sha256"], r["prompt"], r["seed"]) for r in records] == [
        (j.index, j.key, j.sha256, j.prompt, j.seed) for j in rows
    ]
    return records


def test_webp_batch_stores_webp_objects_and_a_manifest_equal_to_the_rows(world, cli, tmp_path):
    from worker.encode import read_parameters

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a blue owl {i}", "sku": f"S{i}"}) + "\n" for i in range(5)))
    done = json.loads(
        _run(
            cli,
            world,
            "submit",
            str(prompts),
            "--model",
            "null",
            "--format",
            "webp",
            "--quality",
            "85",
            "--wait",
            "--json",
        ).splitlines()[-1]
    )
    batch_id = done["batch_id"]
    assert done["succeeded"] == 5
    _manifest_written(batch_id)
    assert world.keys(batch_id) == [f"{batch_id}/{i:06d}.webp" for i in range(5)] + [f"{batch_id}/manifest.jsonl"]
    for i in range(5):
        obj = world.object(f"{batch_id}/{i:06d}.webp")
        assert obj["ContentType"] == "image/webp"
        data = obj["Body"].read()
        assert Image.open(io.BytesIO(data)).format == "WEBP"
        assert read_parameters(data).startswith(f"a blue owl {i}\nSteps: 4, Sampler: LCM")
    assert world.object(f"{batch_id}/manifest.jsonl")["ContentType"] == "application/x-ndjson"

    records = _check_manifest(world, cli, batch_id)
    first = records[0]
    assert (first["format"], first["quality"], first["profile"], first["metadata"]) == (
        "webp",
        85,
        "null",
        {"sku": "S0"},
    )
    assert first["model"] == {"family": "null", "base": "none", "lcm_lora": "none", "dtype": "float32"}
    assert first["url"] == f"s3://{BUCKET}/{world.prefix}/{batch_id}/000000.webp"
    assert first["batch_size"] == 2 and first["render_ms"] is not None

    # The format is part of the submission: the same file as webp is the same batch, as jpeg another.
    from lcmq import api

    assert api.submit(prompts, model="null", image_format="webp", quality=85).batch_id == batch_id
    assert api.submit(prompts, model="null", image_format="webp", quality=86).batch_id != batch_id


def test_jpeg_batch_manifest_follows_failures_sweeper_and_retry(world, cli, tmp_path, monkeypatch):
    """Jobs of a worker that died are failed by the sweeper, which then writes the manifest
    nobody else would; `retry --failed` renders them and the worker rewrites it."""
    from lcmq import api
    from lcmq.errors import InputError
    from lcmq.settings import reset_settings

    monkeypatch.setenv("LCMQ_MAX_ATTEMPTS", "1")  # this process's sweeper fails a lost job at once
    monkeypatch.setenv("LCMQ_MANIFEST_GRACE_S", "0")
    reset_settings()
    repo = api.repository()
    # Freeze the worker while a "ghost" worker claims two jobs, as a worker that is about to die.
    os.killpg(world.worker.pid, signal.SIGSTOP)
    try:
        batch_id = api.submit(
            [f"a red fox {i}" for i in range(6)], model="null", image_format="jpeg", quality=70
        ).batch_id
        ghost = [job.id for job in repo.jobs(batch_id) if job.index in (1, 4)]
        assert len(repo.claim(ghost, "ghost", lease_s=2)) == 2
    finally:
        os.killpg(world.worker.pid, signal.SIGCONT)

    def others_done() -> bool:
        repo.extend_leases(ghost, "ghost", 2)  # the ghost's heartbeat, until it "dies"
        return api.status(batch_id).succeeded == 4

    wait_until(others_done, 30, interval_s=0.1, what="the jobs the ghost does not hold")
    assert api.repository().get_batch(batch_id).manifest_at is None  # not finished: nothing written
    with pytest.raises(InputError, match="queued or running jobs"):
        api.export(batch_id, format="imagefolder", to=tmp_path / "early")

    # The ghost stops renewing; the sweeper fails its jobs, then writes the missing manifest.
    def swept() -> bool:
        api.sweep()
        return api.repository().get_batch(batch_id).manifest_at is not None

    wait_until(swept, 30, interval_s=0.3, what="the sweeper's manifest")
    assert api.status(batch_id).failed == 2
    first = _check_manifest(world, cli, batch_id, via_cli=False)
    assert [r["index"] for r in first] == [0, 2, 3, 5]
    assert all(r["key"].endswith(".jpg") and r["format"] == "jpeg" and r["quality"] == 70 for r in first)
    assert world.object(first[0]["key"])["ContentType"] == "image/jpeg"
    written_at = api.repository().get_batch(batch_id).manifest_at

    retried = json.loads(_run(cli, world, "retry", batch_id, "--failed", "--json"))
    assert retried["failed"] == 0
    _manifest_written(batch_id, after=written_at)
    assert api.status(batch_id).succeeded == 6
    assert [r["index"] for r in _check_manifest(world, cli, batch_id)] == list(range(6))


def test_exports_read_back_with_datasets_and_webdataset(world, cli, tmp_path):
    import datasets
    import webdataset

    from lcmq import api
    from lcmq.errors import InputError

    rows = [{"prompt": f"a green frog {i}", "sku": i} for i in range(6)] + [{"prompt": "ünïcödé 🐸", "tag": ["x"]}]
    batch_id = api.submit(rows, model="null").batch_id
    assert api.wait(batch_id, timeout_s=60).succeeded == 7
    manifest = list(api.manifest(batch_id))

    # imagefolder, into a local folder, through the CLI: `datasets` reads it as it is.
    folder = tmp_path / "imagefolder"
    summary = json.loads(_run(cli, world, "export", batch_id, "--format", "imagefolder", "--to", str(folder)))
    assert summary["images"] == 7
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i:06d}.png" for i in range(7)] + ["metadata.jsonl", "export.json"]
    )
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert loaded.num_rows == 7
    by_index = {row["index"]: row for row in loaded}
    assert [by_index[m["index"]]["prompt"] for m in manifest] == [m["prompt"] for m in manifest]
    assert by_index[6]["image"].size == (64, 64)
    assert json.loads(by_index[3]["metadata"]) == {"sku": 3} and json.loads(by_index[6]["metadata"]) == {"tag": ["x"]}
    assert by_index[0]["sha256"] == hashlib.sha256((folder / "000000.png").read_bytes()).hexdigest()

    # A destination that holds anything is refused: an export never mixes with another.
    with pytest.raises(InputError, match="--to.*already holds"):
        api.export(batch_id, format="webdataset", to=folder)

    # webdataset, into S3, shards of at most 3 samples: 3 + 3 + 1.
    dest = f"s3://{BUCKET}/{world.prefix}-wds/run1"
    summary = json.loads(
        _run(cli, world, "export", batch_id, "--format", "webdataset", "--to", dest, "--shard-size", "3")
    )
    assert summary["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    local = tmp_path / "wds"
    local.mkdir()
    sizes = []
    for name in summary["shards"] + ["export.json"]:
        world.s3.download_file(BUCKET, f"{world.prefix}-wds/run1/{name}", str(local / name))
    for name in summary["shards"]:
        with tarfile.open(local / name) as tar:
            sizes.append(len(tar.getnames()) // 3)
    assert sizes == [3, 3, 1]
    urls = [str(local / name) for name in summary["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(7)]
    assert [s["txt"].decode() for s in samples] == [m["prompt"] for m in manifest]
    assert [json.loads(s["json"])["sha256"] for s in samples] == [hashlib.sha256(s["png"]).hexdigest() for s in samples]
    assert json.loads(samples[0]["json"]) == manifest[0]
    assert json.loads((local / "export.json").read_text())["images"] == 7


def test_tiny_renders_webp_with_the_same_bytes_twice(world, procs, cli, tmp_path):
    from lcmq import api
    from worker.encode import read_parameters

    procs(world.env, "worker", "--model", "tiny").wait_ready()
    batches = [
        api.submit(
            ["a lighthouse at dusk", "a red barn"],
            model="tiny",
            seed=3,
            image_format="webp",
            idempotency_key=f"tiny-webp-{run}-{uuid.uuid4().hex[:6]}",
        ).batch_id
        for run in range(2)
    ]
    for batch_id in batches:
        assert api.wait(batch_id, timeout_s=120).succeeded == 2
    _manifest_written(batches[1])
    first, second = ([(r["seed"], r["sha256"]) for r in api.manifest(b)] for b in batches)
    assert first == second  # same jobs, same bytes
    data = world.object(f"{batches[0]}/000001.webp")["Body"].read()
    image = Image.open(io.BytesIO(data))
    assert image.format == "WEBP" and image.size == (64, 64)
    assert read_parameters(data).startswith("a red barn\nSteps: 4") and "Model: tiny" in read_parameters(data)
    assert len(_manifest_file(world, batches[1]).splitlines()) == 2


def test_a_matrix_renders_every_cell_once_with_its_axis_values(world, cli, tmp_path):
    """2 seeds x 2 step counts x 3 styles over 5 prompts: 60 images, each cell recorded in the
    manifest; a repeated axis value collapses to one job."""
    prompts = tmp_path / "m.txt"
    prompts.write_text("".join(f"a {animal} painted in {{style}}\n" for animal in ("fox", "owl", "cat", "elk", "yak")))
    done = json.loads(
        _run(
            cli,
            world,
            "submit",
            str(prompts),
            "--model",
            "null",
            "--matrix",
            "seed=0..1",
            "--matrix",
            "steps=4,6",
            "--matrix",
            "style=oil,ink,chalk",
            "--wait",
            "--json",
        ).splitlines()[-1]
    )
    assert done["total"] == done["succeeded"] == 60
    _manifest_written(done["batch_id"])
    records = _check_manifest(world, cli, done["batch_id"], via_cli=False)
    cells = {(r["prompt"], r["seed"], r["steps"], r["metadata"]["matrix"]["style"]) for r in records}
    assert len(cells) == 60
    for r in records:
        axes = r["metadata"]["matrix"]
        assert (r["seed"], r["steps"]) == (axes["seed"], axes["steps"])
        assert r["prompt"].endswith(f"painted in {axes['style']}") and "{style}" not in r["prompt"]
    assert len({r["sha256"] for r in records}) == 60  # every cell its own image

    # seed=1,1,2: the repeated 1 is the same cell, rendered once.
    from lcmq import api

    collapsed = api.submit(prompts, model="null", matrix={"seed": ["1", "1", "2"], "steps": [4]})
    assert collapsed.total == 10
    final = api.wait(collapsed.batch_id, timeout_s=60)
    assert final.succeeded == 10
    seeds = sorted((j.prompt, j.seed) for j in api.repository().jobs(collapsed.batch_id))
    assert len(set(seeds)) == 10 and {s for _, s in seeds} == {1, 2}
