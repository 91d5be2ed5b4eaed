"""A real `lcmq worker` on a `vae_decoder = "tiny"` profile whose AutoencoderTiny was pushed to
moto's S3: it fetches it like any s3:// model, renders text2img, img2img (the tiny VAE encodes the
init image) and a ControlNet job with it, and the manifest names the decoder."""

from __future__ import annotations

import json
import re

from PIL import Image, ImageDraw

from lcmq import api
from lcmq.settings import reset_settings

PROFILE = "tiny-fast"


def test_a_worker_renders_every_kind_of_job_with_a_tiny_vae_from_s3(services_env, procs, cli, tmp_path, models_dir):
    from worker.generated import ensure_generated, ensure_tiny_vae, generate_control

    model_dir, _ = ensure_generated("tiny-sd15", models_dir)
    tiny_vae = api.push_model("e2e-taesd", ensure_tiny_vae("tiny-sd15", models_dir))["url"]
    edges = generate_control(model_dir, tmp_path / "edges", "controlnet", seed=21)
    (tmp_path / "lcmq.toml").write_text(
        f'[profiles.{PROFILE}]\nfamily = "sd15"\nbase = "lcmq-generated:tiny-sd15"\n'
        'lcm_lora = "lcmq-generated:tiny-sd15-lcm-lora"\ndtype = "float32"\nwidth = 64\nheight = 64\n'
        f'vae_decoder = "tiny"\ntiny_vae = "{tiny_vae}"\n'
        f'[profiles.{PROFILE}.controls]\nedges = "{edges}"\n'
    )
    reset_settings()
    worker = procs(services_env, "worker", "--model", PROFILE, "--batch-size", "2")
    worker.wait_ready(120)

    shape = Image.new("RGB", (64, 64), (90, 90, 90))
    ImageDraw.Draw(shape).rectangle((12, 12, 52, 52), outline=(255, 255, 255), width=3)
    shape.save(tmp_path / "shape.png")
    rows = [
        {"prompt": "a lighthouse", "seed": 1},
        {"prompt": "a red fox", "seed": 2},
        {"prompt": "a lighthouse", "seed": 1, "init_image": "shape.png", "strength": 0.5},
        {"prompt": "a chair", "seed": 5, "control": [{"name": "edges", "image": "shape.png", "preprocess": "canny"}]},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli(services_env, "submit", str(tmp_path / "rows.jsonl"), "--model", PROFILE, "--wait", "--json")
    assert done.returncode == 0, done.stderr + worker.log[-3000:]
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status["succeeded"] == len(rows), worker.log[-3000:]

    records = list(api.manifest(status["batch_id"]))
    assert [r["model"]["vae_decoder"] for r in records] == ["tiny"] * len(rows)
    assert {r["model"]["tiny_vae"] for r in records} == {tiny_vae}
    digests = {r["sha256"] for r in records}
    assert len(digests) == len(rows)  # img2img and control changed the pixels of the same prompt and seed
    worker.terminate()
    log = worker.log
    assert re.search(r"pipeline loaded .*tiny_vae=\S*/remote/", log), log[-3000:]  # its verified local copy
    assert log.count("model downloaded") == 1, log[-3000:]  # the tiny VAE, through the s3:// cache
