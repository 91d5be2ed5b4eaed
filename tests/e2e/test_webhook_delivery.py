"""The acceptance: a webhook receiver that is down for the first deliveries still gets exactly
the final status once it comes back, after an API restart in between (real API processes, a
real worker, Postgres, Redis, S3, and a real receiver on a loopback port)."""

from __future__ import annotations

import json
import time

import httpx

from bench.harness import free_port, wait_until
from lcmq import access, api
from lcmq.settings import reset_settings
from lcmq.webhooks import verify
from tests.support.api_server import start_api
from tests.support.webhook_receiver import WebhookReceiver

QUICK_WEBHOOKS = {
    "LCMQ_WEBHOOK_ALLOW_PRIVATE": "true",
    "LCMQ_WEBHOOK_BACKOFF_FIRST_S": "0.2",
    "LCMQ_WEBHOOK_BACKOFF_MAX_S": "0.5",
    "LCMQ_WEBHOOK_POLL_S": "0.2",
    "LCMQ_WEBHOOK_TIMEOUT_S": "2",
}


def attempts_of(batch_id: str) -> list[dict]:
    deliveries = api.webhook_deliveries(batch_id)
    return deliveries[0]["history"] if deliveries else []


def test_a_receiver_down_at_first_gets_the_final_status_once_after_an_api_restart(
    isolated_env, procs, cli, monkeypatch
):
    env = isolated_env | QUICK_WEBHOOKS
    for key, value in QUICK_WEBHOOKS.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    key = access.create_key(api.repository(), "shop")
    other = access.create_key(api.repository(), "other")
    port = free_port()  # nothing listens there yet: the receiver is down
    first_api = start_api(procs, env)
    worker = procs(env, "worker", "--model", "null").wait_ready()

    submitted = httpx.post(
        f"{first_api.url}/v1/batches",
        json={"model": "null", "rows": ["a red fox", "a blue owl"], "webhook_url": f"http://127.0.0.1:{port}/hook"},
        headers={"Authorization": f"Bearer {key.key}"},
    )
    assert submitted.status_code == 201, submitted.text
    batch_id = submitted.json()["batch_id"]
    final = api.wait(batch_id, timeout_s=60)
    assert final.succeeded == 2
    wait_until(lambda: len(attempts_of(batch_id)) >= 2, 30, interval_s=0.1, what="two failed attempts")
    first_api.process.kill()  # SIGKILL: no clean stop, whatever it held is left as it was
    worker.kill()
    failed = attempts_of(batch_id)
    assert all(a["status_code"] is None and "ConnectError" in a["error"] for a in failed), failed

    with WebhookReceiver(port=port) as receiver:
        second_api = start_api(procs, env)
        wait_until(lambda: receiver.received, 30, interval_s=0.1, what="the webhook at the receiver")
        time.sleep(1.0)  # five more turns of the sender: nothing else may arrive
    [received] = receiver.received
    assert verify(key.webhook_secret, received.headers, received.body)
    body = json.loads(received.body)
    assert body["event"] == "batch.final" and body["batch_id"] == batch_id
    assert {k: body[k] for k in ("total", "succeeded", "failed", "canceled", "queued", "running")} == {
        "total": 2,
        "succeeded": 2,
        "failed": 0,
        "canceled": 0,
        "queued": 0,
        "running": 0,
    }
    assert body == {"event": "batch.final"} | api.batches(limit=1)[0]

    shown = cli(env, "webhooks", batch_id, "--json")
    assert shown.returncode == 0, shown.stderr
    [delivery] = json.loads(shown.stdout)
    assert delivery["state"] == "delivered" and delivery["id"] == received.headers["webhook-id"]
    history = delivery["history"]
    assert len(history) == delivery["attempts"] >= len(failed) + 1
    assert [a["status_code"] for a in history[-1:]] == [200]
    assert all(a["status_code"] is None for a in history[:-1])
    text = cli(env, "webhooks", batch_id)
    assert text.returncode == 0 and "delivered" in text.stdout and "HTTP 200" in text.stdout
    assert "ConnectError" in text.stdout

    # The same list over HTTP, for the key's own batch only.
    route = f"{second_api.url}/v1/batches/{batch_id}/webhooks"
    mine = httpx.get(route, headers={"Authorization": f"Bearer {key.key}"})
    assert mine.status_code == 200 and mine.json()["deliveries"] == [delivery]
    assert httpx.get(route, headers={"Authorization": f"Bearer {other.key}"}).status_code == 404
    assert httpx.get(route).status_code == 401
