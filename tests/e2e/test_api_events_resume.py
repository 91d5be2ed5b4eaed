"""The events stream resumes: a client that reconnects with `Last-Event-ID` is not sent the
counts it already has, only what changed since, then `done`."""

from __future__ import annotations

import threading
import time

import httpx

from lcmq import access, api
from lcmq.http.events import event_id
from tests.e2e.test_api_e2e import read_events
from tests.support.api_server import start_api


def test_a_reconnect_with_last_event_id_skips_the_counts_it_has(services_env, procs):
    server = start_api(procs, services_env)
    key = access.create_key(api.repository(), "watcher")
    headers = {"Authorization": f"Bearer {key.key}"}
    batch = httpx.post(
        f"{server.url}/v1/batches", json={"model": "null", "rows": ["a", "b", "c"]}, headers=headers
    ).json()  # no worker: it stays queued until canceled
    url = f"{server.url}{batch['links']['events']}"
    current = event_id(api.status(batch["batch_id"]))

    def cancel_soon() -> None:
        time.sleep(1.5)
        httpx.post(f"{server.url}{batch['links']['cancel']}", headers=headers)

    threading.Thread(target=cancel_soon, daemon=True).start()
    resumed = read_events(url, headers | {"Last-Event-ID": current}, timeout_s=30)
    assert [name for name, _ in resumed] == ["done"]  # the queued counts it had were not sent again
    assert resumed[0][1]["canceled"] == 3

    fresh = read_events(url, headers, timeout_s=30)  # a new client: the final counts, once
    assert [name for name, _ in fresh] == ["done"] and fresh[0][1]["canceled"] == 3
