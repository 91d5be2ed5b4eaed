"""A worker on an EMPTY models dir renders a profile whose base, LCM-LoRA and a style LoRA live in
moto's S3 (pushed with `lcmq models push`): its two pool processes share one download of each,
and its rows say how the load found the models."""

from __future__ import annotations

import json

from bench.harness import wait_until
from lcmq import api
from lcmq.settings import reset_settings
from worker.model_fetch import REMOTE_DIR

PROFILE = "s3tiny"


def test_a_worker_on_an_empty_models_dir_renders_models_pushed_to_s3(services_env, procs, cli, tmp_path, models_dir):
    from worker.generated import ensure_generated, generate_style_lora

    model_dir, lora_dir = ensure_generated("tiny-sd15", models_dir)
    style_dir = tmp_path / "ink"
    generate_style_lora(model_dir, style_dir / "pytorch_lora_weights.safetensors", seed=11)
    base = api.push_model("e2e-tiny-base", model_dir)["url"]
    lcm = api.push_model("e2e-tiny-lcm", lora_dir / "pytorch_lora_weights.safetensors")["url"]
    style = api.push_model("e2e-ink", style_dir)["url"]
    assert base.endswith("/models/e2e-tiny-base/") and lcm.endswith("/pytorch_lora_weights.safetensors")

    (tmp_path / "lcmq.toml").write_text(
        f'[profiles.{PROFILE}]\nfamily = "sd15"\nbase = "{base}"\nlcm_lora = "{lcm}"\n'
        'dtype = "float32"\nwidth = 64\nheight = 64\n'
    )
    reset_settings()
    empty = tmp_path / "empty-models"
    worker_env = services_env | {"LCMQ_MODELS_DIR": str(empty), "LCMQ_HEARTBEAT_S": "1"}
    worker = procs(worker_env, "worker", "--model", PROFILE, "--concurrency", "2", "--batch-size", "2")
    worker.wait_ready(120)

    rows = [{"prompt": f"a lighthouse {i}", "seed": i} for i in range(4)]
    rows[3]["loras"] = [{"name": "ink", "path": style, "weight": 0.8}]
    batch_file = tmp_path / "prompts.jsonl"
    batch_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli(services_env, "submit", str(batch_file), "--model", PROFILE, "--wait", "--json", "--timeout", "240")
    assert done.returncode == 0, done.stderr + worker.log[-3000:]
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status["succeeded"] == 4, worker.log[-3000:]

    # One download per model (base, LCM-LoRA, style) for the whole host, both processes loaded.
    wait_until(lambda: worker.log.count("pipeline loaded") == 2, 120, what="both pool processes loaded")
    assert worker.log.count("model downloaded") == 3, worker.log[-5000:]
    assert worker.log.count("model cache hit") >= 2  # the other process's base and LCM-LoRA
    remote = sorted(p.name for p in (empty / REMOTE_DIR).iterdir())
    assert len(remote) == 6 and not [name for name in remote if name.startswith(".tmp-")], remote

    def rows_reported() -> list[dict] | None:
        mine = [w for w in api.workers() if w["profile"] == PROFILE and w["model_cache"]]
        return mine if len(mine) == 2 else None

    workers = wait_until(rows_reported, 30, interval_s=0.3, what="both worker rows with model_cache")
    # The first process to load downloads both models ("miss"); the other waits and finds them
    # ("hit"), unless they raced for the two locks in turn ("partial" each).
    assert {w["model_cache"] for w in workers} in ({"miss", "hit"}, {"partial"})
    assert all(w["load_s"] is not None and w["fetch_s"] is not None and w["fetch_s"] <= w["load_s"] for w in workers)
    shown = cli(services_env, "workers")
    assert shown.returncode == 0 and "models" in shown.stdout.splitlines()[0]
