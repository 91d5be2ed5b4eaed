"""The gateway on the embedded install (SQLite, file:// storage), in process: it cannot presign,
so a claim is 503 and claims nothing; its body limit covers /gateway/ only; tokens and API keys
do not open each other's routes."""

from __future__ import annotations

from fastapi.testclient import TestClient

from lcmq import access, api, workertokens
from lcmq.http.app import create_app
from lcmq.settings import get_settings


def test_file_storage_refuses_claims_and_the_body_limit_is_the_gateways_own(embedded_env, monkeypatch):
    monkeypatch.setenv("LCMQ_GATEWAY_MAX_BODY_KB", "1")
    from lcmq.settings import reset_settings

    reset_settings()
    repo = api.repository()
    batch = api.submit(["a red fox"], model="tiny")
    token = workertokens.create_token(repo, "local-box", ["tiny"]).token
    client = TestClient(create_app(get_settings(), run_background=False))
    auth = {"Authorization": f"Bearer {token}"}

    refused = client.post("/gateway/v1/claim", json={"node": "n1", "profile": "tiny"}, headers=auth)
    assert refused.status_code == 503 and "s3://" in refused.json()["error"]
    assert [job.state for job in repo.jobs(batch.batch_id)] == ["queued"]

    big = client.post("/gateway/v1/renew", json={"node": "n1", "job_ids": ["x" * 30] * 100}, headers=auth)
    assert big.status_code == 413 and "1 KiB (LCMQ_GATEWAY_MAX_BODY_KB)" in big.json()["error"]
    key = access.create_key(repo, "shop").key
    # The same body on /v1 is under the API's own limit: refused for its key, not its size.
    assert client.post("/v1/batches", json={"rows": ["x" * 2000], "model": "tiny"}, headers=auth).status_code == 401
    created = client.post(
        "/v1/batches", json={"rows": ["x" * 2000], "model": "tiny"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert created.status_code != 413, created.text
    assert client.post("/gateway/v1/hello", json={}, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    bad_node = client.post("/gateway/v1/renew", json={"node": "a/b", "job_ids": []}, headers=auth)
    assert bad_node.status_code == 422 and bad_node.json()["field"] == "node"
