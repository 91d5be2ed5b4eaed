"""The issue's acceptance over HTTP: a real `lcmq api` process, a real `lcmq worker --model tiny`,
Postgres, Redis and moto S3. Upload a prompt file, follow its events to `done`, read the manifest;
cancel a larger batch mid-way; repeat a POST with its Idempotency-Key; no key, another key and a
revoked key; the uploaded batch's signed webhook arrives at a local receiver and verifies.
(tests/e2e/test_webhook_delivery.py: a receiver that is down at first, and an API restart.)"""

from __future__ import annotations

import json

import httpx

from bench.harness import wait_until
from lcmq import access, api
from lcmq.webhooks import verify
from tests.support.api_server import start_api
from tests.support.webhook_receiver import WebhookReceiver

UPLOADED = 6
LARGE = 160


def read_events(url: str, headers: dict[str, str], timeout_s: float = 180) -> list[tuple[str, dict]]:
    """(event, data) of a batch's event stream, read until the stream ends (after `done`)."""
    events, event = [], None
    with httpx.stream("GET", url, headers=headers, timeout=timeout_s) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for text in response.iter_lines():
            if text.startswith("event: "):
                event = text.removeprefix("event: ")
            elif text.startswith("data: "):
                events.append((event, json.loads(text.removeprefix("data: "))))
    return events


def test_submit_watch_read_cancel_repeat_and_refuse_over_http(isolated_env, procs, cli, tmp_path):
    env = isolated_env | {"LCMQ_WEBHOOK_ALLOW_PRIVATE": "true"}
    worker = procs(env, "worker", "--model", "tiny", "--batch-size", "2").wait_ready()
    server = start_api(procs, env)
    wait_until(lambda: "pipeline loaded" in worker.log, 120, what="the worker's pipeline loaded")
    repo = api.repository()
    alice = access.create_key(repo, "alice")
    bob = access.create_key(repo, "bob")
    as_alice = {"Authorization": f"Bearer {alice.key}"}
    http = httpx.Client(base_url=server.url, headers=as_alice, timeout=30)
    receiver = WebhookReceiver()

    # Upload a prompt file; its events go to `done`; the manifest has every image.
    prompts = "".join(f"a lighthouse number {i}\n" for i in range(UPLOADED)).encode()
    submitted = http.post(
        "/v1/batches",
        files={"file": ("lighthouses.txt", prompts, "text/plain")},
        data={"model": "tiny", "steps": "2", "name": "uploaded", "webhook_url": receiver.url},
        headers={"Idempotency-Key": "upload-1"},
    )
    assert submitted.status_code == 201, submitted.text
    batch = submitted.json()
    assert batch["total"] == UPLOADED
    assert repo.get_batch(batch["batch_id"]).webhook_url == receiver.url
    events = read_events(server.url + batch["links"]["events"], as_alice)
    assert events[-1][0] == "done" and [name for name, _ in events].count("done") == 1
    assert events[-1][1]["succeeded"] == UPLOADED and events[-1][1]["batch_id"] == batch["batch_id"]
    assert all(name == "status" for name, _ in events[:-1])
    manifest = http.get(batch["links"]["manifest"])
    assert manifest.headers["content-type"] == "application/x-ndjson"
    records = [json.loads(line) for line in manifest.text.splitlines()]
    assert [r["index"] for r in records] == list(range(UPLOADED))
    assert records[0]["prompt"] == "a lighthouse number 0" and records[0]["steps"] == 2
    # The webhook: once, signed with alice's secret, carrying the final status.
    wait_until(lambda: receiver.received, 30, what="the batch's webhook")
    (hook,) = receiver.received
    assert verify(alice.webhook_secret, hook.headers, hook.body)
    assert not verify(bob.webhook_secret, hook.headers, hook.body)
    sent = json.loads(hook.body)
    assert (sent["event"], sent["batch_id"], sent["succeeded"]) == ("batch.final", batch["batch_id"], UPLOADED)

    # The same Idempotency-Key again, even with another body: the first batch, 200.
    repeat = http.post(
        "/v1/batches", json={"model": "tiny", "rows": ["another"]}, headers={"Idempotency-Key": "upload-1"}
    )
    assert repeat.status_code == 200 and repeat.json()["batch_id"] == batch["batch_id"]
    assert repeat.json()["resubmitted"] is True

    # A larger batch, canceled once its first image is done: the rest never renders.
    large = http.post(
        "/v1/batches",
        json={"model": "tiny", "rows": [f"a harbour at dawn, {i}" for i in range(LARGE)], "chunk_size": 2},
    ).json()
    wait_until(lambda: http.get(large["links"]["self"]).json()["succeeded"] >= 1, 120, what="a first image")
    assert http.post(large["links"]["cancel"]).status_code == 200
    final = read_events(server.url + large["links"]["events"], as_alice)[-1][1]
    assert final["canceled"] > 0 and final["succeeded"] >= 1
    assert final["succeeded"] + final["canceled"] + final["failed"] == final["total"] == LARGE

    # No key: 401. Another key: the batch does not exist for it. A revoked key: 401 at once.
    assert httpx.get(f"{server.url}/v1/batches/{batch['batch_id']}").status_code == 401
    as_bob = {"Authorization": f"Bearer {bob.key}"}
    assert httpx.get(f"{server.url}/v1/batches/{batch['batch_id']}", headers=as_bob).status_code == 404
    assert httpx.get(f"{server.url}/v1/batches", headers=as_bob).json() == {"data": [], "next_cursor": None}
    revoked = cli(env, "apikey", "revoke", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert http.get(f"/v1/batches/{batch['batch_id']}").status_code == 401
    # The access log names the key, never the key itself.
    assert f"path={large['links']['self']} status=200" in server.process.log
    assert "key=alice" in server.process.log and alice.key not in server.process.log
    assert len(receiver.received) == 1  # still once
    receiver.close()
