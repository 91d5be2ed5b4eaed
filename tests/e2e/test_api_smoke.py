"""`lcmq api` as a real process: it starts, answers /healthz, and refuses a call without a key."""

from __future__ import annotations

import httpx

from tests.support.api_server import start_api


def test_the_api_starts_and_a_call_without_a_key_is_refused(services_env, procs):
    server = start_api(procs, services_env)
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert server.signin_token().startswith("lcmq_")
    assert server.signin_token() not in httpx.get(f"{server.url}/openapi.json").text
