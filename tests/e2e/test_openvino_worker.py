"""A real `lcmq worker` whose profile runs on OpenVINO renders a batch through the same
micro-batch loop; the manifest names the runtime, and img2img is refused at submit."""

from __future__ import annotations

import json

from PIL import Image


def test_an_openvino_profile_renders_and_the_manifest_says_so(embedded_env, procs, cli, tmp_path):
    (tmp_path / "lcmq.toml").write_text('[profiles.tiny]\nruntime = "openvino"\n')
    worker = procs(embedded_env, "worker", "--model", "tiny", "--device", "cpu", "--batch-size", "4").wait_ready()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a lighthouse {i}", "seed": i}) + "\n" for i in range(5)))
    done = cli(embedded_env, "submit", str(prompts), "--model", "tiny", "--wait", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    batch_id = json.loads(done.stdout.strip().splitlines()[-1])["batch_id"]
    records = [json.loads(line) for line in cli(embedded_env, "manifest", batch_id).stdout.splitlines()]
    assert len(records) == 5
    assert "openvino runtime" in worker.log and "precision=f32" in worker.log  # the load said so
    assert {json.dumps(r["model"], sort_keys=True) for r in records} == {
        json.dumps(
            {
                "family": "sd15",
                "base": "lcmq-generated:tiny-sd15",
                "lcm_lora": "lcmq-generated:tiny-sd15-lcm-lora",
                "dtype": "float32",
                "runtime": "openvino",
            },
            sort_keys=True,
        )
    }
    assert {r["batch_size"] for r in records} == {4, 1}  # micro-batches, as with torch
    image = Image.open(tmp_path / "renders" / records[0]["key"])
    assert image.size == (64, 64) and len(set(image.getdata())) > 16  # rendered, not a flat fill

    (tmp_path / "cat.png").write_bytes(b"x")
    prompts.write_text(json.dumps({"prompt": "a cat", "init_image": "cat.png"}) + "\n")
    refused = cli(embedded_env, "submit", str(prompts), "--model", "tiny")
    assert refused.returncode != 0
    assert f"{prompts}:1:init_image: profile tiny runs on openvino, which renders text-to-image only" in refused.stderr
    assert "Traceback" not in refused.stderr
