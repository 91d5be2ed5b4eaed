"""An edge worker with no credentials and an EMPTY models dir loads a profile whose base and
LCM-LoRA were pushed to moto's S3: it reads them through the gateway's presigned GETs
(POST /gateway/v1/models), renders a batch, and its row says it downloaded them. A token gets
GETs only for the models its profiles name."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from support.api_server import start_api
from support.edge import SECRET_PREFIXES, edge_env, worker_token

from bench.harness import done, wait_until
from lcmq import api
from lcmq.settings import reset_settings
from worker.model_fetch import REMOTE_DIR

PROFILE = "s3edge"


def _profile_toml(base: str, lcm: str) -> str:
    return (
        f'[profiles.{PROFILE}]\nfamily = "sd15"\nbase = "{base}"\nlcm_lora = "{lcm}"\n'
        'dtype = "float32"\nwidth = 64\nheight = 64\n'
    )


def test_an_edge_worker_fetches_pushed_models_through_the_gateway(services_env, procs, tmp_path, models_dir):
    from worker.generated import ensure_generated

    model_dir, lora_dir = ensure_generated("tiny-sd15", models_dir)
    base = api.push_model("edge-tiny-base", model_dir)["url"]
    lcm = api.push_model("edge-tiny-lcm", lora_dir / "pytorch_lora_weights.safetensors")["url"]
    other = api.push_model("edge-not-a-profile-model", lora_dir / "pytorch_lora_weights.safetensors")["url"]
    (tmp_path / "lcmq.toml").write_text(_profile_toml(base, lcm))  # the gateway's and this process's
    reset_settings()
    gateway = start_api(procs, services_env | {"LCMQ_HEARTBEAT_S": "1"})
    token = worker_token("modelbox", profiles=PROFILE)

    # A token gets presigned GETs only for its profiles' models: any other key is 403.
    def models(profile: str, urls: list[str]) -> httpx.Response:
        body = {"node": "probe", "profile": profile, "urls": urls}
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.post(f"{gateway.url}/gateway/v1/models", json=body, headers=headers, timeout=10)

    outside = models(PROFILE, [base, other])
    assert outside.status_code == 403 and "is not a model of profile" in outside.json()["error"], outside.text
    assert models("tiny", [base]).status_code == 403  # not one of the token's profiles
    bucket_key = models(PROFILE, [base.rstrip("/") + "/model_index.json"])  # a file inside, not the model
    assert bucket_key.status_code == 403, bucket_key.text
    granted = models(PROFILE, [lcm]).json()["models"][lcm]
    assert json.loads(granted["manifest"])["kind"] == "file" and list(granted["urls"]) == [
        "pytorch_lora_weights.safetensors"
    ]

    home = tmp_path / "rented-box"
    empty = home / "models"
    env = edge_env(services_env, home, LCMQ_MODELS_DIR=str(empty))
    assert not any(key.startswith(SECRET_PREFIXES) for key in env)  # no database, broker or bucket
    home.mkdir()
    (home / "lcmq.toml").write_text(_profile_toml(base, lcm))  # the box knows the profile, not the bucket
    edge = procs(env, "worker", "--model", PROFILE, "--gateway", gateway.url, "--token", token, "--name", "m1")
    edge.wait_ready(120)

    rows = [{"prompt": f"a lighthouse {i}", "seed": i} for i in range(4)]
    batch_file = tmp_path / "prompts.jsonl"
    batch_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch_id = api.submit(batch_file, model=PROFILE).batch_id
    wait_until(lambda: done(batch_id), 120, interval_s=0.2, what=f"batch {batch_id} to finish")
    jobs = api.repository().jobs(batch_id)
    assert [(j.state, j.worker) for j in jobs] == [("succeeded", "edge/modelbox/m1")] * 4, [j.error for j in jobs]

    assert edge.log.count("model downloaded") == 2, edge.log[-4000:]
    entries = sorted(p.name for p in Path(empty, REMOTE_DIR).iterdir())
    assert len(entries) == 4 and not [n for n in entries if n.startswith(".tmp-")], entries  # 2 entries + locks
    assert token not in edge.log and "X-Amz-Signature" not in edge.log

    def row() -> dict | None:
        mine = [w for w in api.workers() if w["node"] == "edge/modelbox/m1"]
        return mine[0] if mine and mine[0]["model_cache"] else None

    reported = wait_until(row, 30, interval_s=0.3, what="the edge worker's row with model_cache")
    assert reported["model_cache"] == "miss", reported
    assert reported["fetch_s"] is not None and reported["load_s"] is not None
    assert reported["fetch_s"] <= reported["load_s"], reported
