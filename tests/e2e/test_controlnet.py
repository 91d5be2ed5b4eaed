"""ControlNet and T2I-Adapter jobs end to end: CLI (--control, rows' control) → Redis → a real
`lcmq worker` on tiny and on tiny-xl → S3 (moto) → Postgres. The conditioning models are
generated beside the tiny models, saved with save_pretrained (and one as a single file), and
declared in lcmq.toml as users declare theirs. One worker serves every batch of a model."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
from PIL import Image, ImageDraw

from lcmq import api
from worker.encode import read_parameters

LIMIT = 16_384  # LCMQ_MAX_INIT_IMAGE_BYTES for these workers: the noisy image below is larger


def _submit(env, cli, path, model, *flags):
    done = cli(env, "submit", str(path), "--model", model, "--chunk-size", "16", "--wait", "--json", *flags)
    assert done.returncode in (0, 1), done.stderr  # 1: some job failed, which these batches mean to
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shape(path, box) -> None:
    """A white outline on gray: canny finds its edges."""
    image = Image.new("RGB", (64, 64), (90, 90, 90))
    ImageDraw.Draw(image).rectangle(box, outline=(255, 255, 255), width=3)
    image.save(path)


def _write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _profile_toml(model: str, controls: dict) -> str:
    lines = [f"[profiles.{model}.controls]"]
    for name, ref in controls.items():
        if isinstance(ref, tuple):
            lines.append(f'{name} = {{ path = "{ref[0]}", config = "{ref[1]}" }}')
        else:
            lines.append(f'{name} = "{ref}"')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("model", "generated"), [("tiny", "tiny-sd15"), ("tiny-xl", "tiny-sdxl")])
def test_controlled_renders_through_a_worker(services_env, procs, cli, tmp_path, models_dir, model, generated):
    from worker.generated import ensure_generated, generate_control, generate_style_lora, single_file_control

    env = services_env
    bucket, prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    model_dir, _ = ensure_generated(generated, models_dir)
    edges = generate_control(model_dir, tmp_path / "edges", "controlnet", seed=21)
    depth = generate_control(model_dir, tmp_path / "depth", "controlnet", seed=22)
    sketch = generate_control(model_dir, tmp_path / "sketch", "t2i_adapter", seed=23)
    lines = single_file_control(edges, tmp_path / "lines.safetensors")
    ink = generate_style_lora(model_dir, tmp_path / "ink.safetensors", seed=11)
    controls = {"edges": edges, "depth": depth, "sketch": sketch, "lines": (lines, edges)}
    (tmp_path / "lcmq.toml").write_text(_profile_toml(model, controls))
    worker = procs(env | {"LCMQ_MAX_INIT_IMAGE_BYTES": str(LIMIT)}, "worker", "--model", model, "--batch-size", "8")

    _shape(tmp_path / "shape.png", (12, 12, 52, 52))
    s3.upload_file(str(tmp_path / "shape.png"), bucket, f"{prefix}-{model}/shape.png")
    s3.put_object(Bucket=bucket, Key=f"{prefix}-{model}/junk.png", Body=b"\x89PNG but not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    assert (tmp_path / "noise.png").stat().st_size > LIMIT
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "gray.png")
    remote = f"s3://{bucket}/{prefix}-{model}/shape.png"
    canny = {"name": "edges", "image": "shape.png", "preprocess": "canny", "low": 50, "high": 150}
    rows = [
        {"prompt": "a chair", "seed": 5, "control": [canny]},
        {"prompt": "a chair", "seed": 5, "control": [canny | {"scale": 0}]},
        {"prompt": "a chair", "seed": 5, "control": [canny | {"image": remote}]},  # the same bytes, from S3
        {"prompt": "a chair", "seed": 5, "control": [canny]},  # row 0 again
        {"prompt": "a chair", "seed": 5, "control": [canny, {"name": "depth", "image": "gray.png", "scale": 0.7}]},
        {"prompt": "a chair", "seed": 5, "control": [canny | {"image": f"s3://{bucket}/{prefix}-{model}/junk.png"}]},
        {"prompt": "a chair", "seed": 5, "control": [canny | {"image": "noise.png"}]},
        {"prompt": "a chair", "seed": 5, "control": [canny | {"name": "lines"}]},  # the single file
        {
            "prompt": "a chair",
            "seed": 5,
            "control": [canny | {"end": 0.5}],
            "init_image": "gray.png",
            "strength": 0.5,
            "loras": [{"name": "ink", "path": str(ink), "weight": 0.8}],
        },
        {"prompt": "a chair", "seed": 5, "control": [{"name": "sketch", "image": "shape.png", "preprocess": "canny"}]},
        {"prompt": "a chair", "seed": 5},  # the batch's --control
    ]
    batch_file = tmp_path / "controls.jsonl"
    _write_rows(batch_file, rows)
    worker.wait_ready()
    result = _submit(env, cli, batch_file, model, "--control", f"depth={tmp_path / 'shape.png'}:0.5")
    jobs = api.repository().jobs(result["batch_id"])
    states = [j.state for j in jobs]
    assert states == ["succeeded"] * 5 + ["failed", "failed"] + ["succeeded"] * 4, [(j.state, j.error) for j in jobs]
    assert "ControlImageError" in jobs[5].error and f"{prefix}-{model}/junk.png" in jobs[5].error
    assert "not a readable image" in jobs[5].error
    # Uploaded at submit, too large for the worker: named by its control and its stored URL.
    assert f"control image (edges) {jobs[6].control[0]['image']} has" in jobs[6].error
    assert f"at most {LIMIT}" in jobs[6].error
    sha = [j.sha256 for j in jobs]
    assert sha[0] != sha[1]  # scale 1 and scale 0
    assert sha[0] == sha[2] == sha[3]  # the same image from S3 or a file, and a rerun: the same bytes
    assert len({sha[0], sha[4], sha[7], sha[8], sha[9], sha[10]}) == 6
    assert jobs[0].batch_size == 3 and jobs[1].batch_size == 1  # one control set, one call (rows 5 and 6 failed first)
    assert jobs[0].control[0]["image"].startswith(f"s3://{bucket}/{prefix}/{result['batch_id']}/inputs/")
    assert [c["name"] for c in jobs[4].control] == ["depth", "edges"] and jobs[10].control[0]["scale"] == 0.5
    assert jobs[9].control[0]["type"] == "t2i_adapter" and jobs[9].control[0]["scale"] == 0.8

    data = s3.get_object(Bucket=bucket, Key=f"{prefix}/{jobs[0].key}")["Body"].read()
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 1' in read_parameters(data)
    manifest = [json.loads(line) for line in cli(env, "manifest", result["batch_id"]).stdout.splitlines()]
    assert manifest[0]["control"] == jobs[0].control
    # Each control records the sha256 of its image as rendered from (fitted, canny applied): the
    # same for the same bytes from S3 or from a file, another for another preprocessing.
    digests = {m["index"]: m["control"][0]["sha256"] for m in manifest}
    assert digests[0] == digests[2] == digests[3] and len(digests[0]) == 64
    assert digests[10] != digests[0]  # the same shape, not preprocessed
    assert "control" not in manifest[-1] or manifest[-1]["control"][0]["name"] == "depth"

    if model == "tiny":  # a catalog whose item's control image changes re-renders that item only
        _catalog_rerenders_the_changed_control(env, cli, tmp_path)
    worker.terminate()
    assert worker.log.count("pipeline loaded") == 1


def _catalog_rerenders_the_changed_control(env, cli, tmp_path) -> None:
    for i in range(3):
        _shape(tmp_path / f"item{i}.png", (8 + 4 * i, 8, 40, 40))
    catalog = tmp_path / "items.jsonl"
    items = [
        {
            "id": f"item-{i}",
            "name": f"chair {i}",
            "control": [{"name": "edges", "image": str(tmp_path / f"item{i}.png")}],
        }
        for i in range(3)
    ]
    _write_rows(catalog, items)
    add = cli(
        env,
        "schedule",
        "add",
        "cn",
        "--catalog",
        str(catalog),
        "--template",
        "{name}",
        "--cron",
        "0 3 * * *",
        "--model",
        "tiny",
    )
    assert add.returncode == 0, add.stderr

    def run() -> dict:
        done = cli(env, "schedule", "run", "cn", "--wait", "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["items"]["new"] == 3 and first["succeeded"] == 3
    _shape(tmp_path / "item1.png", (20, 20, 60, 60))  # the same file name, another image
    second = run()
    assert second["items"] == {"new": 0, "changed": 1, "unchanged": 2, "removed": 0}
    (job,) = api.repository().jobs(second["batch_id"])
    assert job.key.endswith("item-1.png") and job.state == "succeeded"
