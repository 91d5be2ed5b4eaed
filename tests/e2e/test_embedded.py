"""The embedded default (SQLite, filesystem broker, ./renders) and worker start-up checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image


def test_demo_renders_the_sample_batch_without_servers(embedded_env, cli, tmp_path):
    env = {
        k: v for k, v in embedded_env.items() if k not in ("LCMQ_STORAGE_URL", "LCMQ_HOME", "LCMQ_CONFIG")
    }  # the real defaults
    done = cli(env, "demo", timeout_s=600)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"images are in (file://\S+)", done.stdout)
    assert match, done.stdout
    assert done.stdout.count(match.group(1)) == 1  # said once
    # lcmq's own lines only: Celery's banner and warnings go to the worker's log file.
    assert not any(noise in done.stderr for noise in ("WARNING", "celery", "Warm shutdown")), done.stderr
    folder = Path(match.group(1).removeprefix("file://"))
    assert folder.parent == tmp_path / "renders"
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(16)]
    assert all(Image.open(p).size == (64, 64) for p in pngs)
    # The worker wrote manifest.jsonl as it recorded the last job (before its warm shutdown ended).
    manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [m["key"] for m in manifest] == [f"{folder.name}/{p.name}" for p in pngs]
    assert (tmp_path / ".lcmq" / "lcmq.db").exists()
    listing = json.loads(cli(env, "batches", "--json").stdout)
    assert listing[0]["succeeded"] == 16 and listing[0]["name"] == "demo"


def _worker_start_error(cli, env, profile: str) -> str:
    done = cli(env, "worker", "--model", profile, timeout_s=60)
    assert done.returncode != 0
    return done.stderr


def test_worker_refuses_a_profile_that_cannot_load(embedded_env, cli, tmp_path):
    sd15_folder = tmp_path / "sd15-model"
    sd15_folder.mkdir()
    (sd15_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "lcmq.toml").write_text(
        '[profiles.missing]\nfamily = "sd15"\nbase = "/nonexistent/model"\n\n'
        f'[profiles.wrongfamily]\nfamily = "sdxl"\nbase = "{sd15_folder}"\n'
    )
    assert "base path /nonexistent/model does not exist" in _worker_start_error(cli, embedded_env, "missing")
    error = _worker_start_error(cli, embedded_env, "wrongfamily")
    assert "expects a StableDiffusionXLPipeline" in error and "StableDiffusionPipeline" in error
    assert "unknown model profile 'nope'" in _worker_start_error(cli, embedded_env, "nope")
