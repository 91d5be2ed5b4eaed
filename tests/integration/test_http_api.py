"""The /v1 API through FastAPI's TestClient over the real app, on Postgres, Redis and moto S3."""

from __future__ import annotations

import json
import logging

import boto3
import pytest
from fastapi.testclient import TestClient

from bench.harness import free_port
from lcmq import access, api


@pytest.fixture
def app(services_env):
    from lcmq.http.app import create_app

    return create_app(run_background=False)


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def keys(app):
    """Two plain keys and an admin key, each as its Authorization header."""
    repo = app.state.repo
    made = {}
    for role, admin in (("alice", False), ("bob", False), ("admin", True)):
        new = access.create_key(repo, f"{role}-{free_port()}", admin=admin)
        made[role] = {"Authorization": f"Bearer {new.key}", "name": new.name}
    return made


def auth(key: dict) -> dict:
    return {"Authorization": key["Authorization"]}


def submit(client, key, rows, **options):
    return client.post("/v1/batches", json={"model": "tiny", "rows": rows, **options}, headers=auth(key))


def test_json_submit_201_then_200_for_the_same_body_and_for_the_same_idempotency_key(client, keys):
    first = submit(client, keys["alice"], ["a red fox", {"prompt": "a blue owl", "seed": 7}], steps=4)
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["total"], body["queued"]) == (2, 2) and "resubmitted" not in body
    batch_id = body["batch_id"]
    assert body["links"] == {
        "self": f"/v1/batches/{batch_id}",
        "jobs": f"/v1/batches/{batch_id}/jobs",
        "manifest": f"/v1/batches/{batch_id}/manifest",
        "events": f"/v1/batches/{batch_id}/events",
        "cancel": f"/v1/batches/{batch_id}/cancel",
    }
    repeat = submit(client, keys["alice"], ["a red fox", {"prompt": "a blue owl", "seed": 7}], steps=4)
    assert repeat.status_code == 200 and repeat.json()["batch_id"] == batch_id and repeat.json()["resubmitted"]

    headers = auth(keys["alice"]) | {"Idempotency-Key": "order-1"}
    made = client.post("/v1/batches", json={"model": "tiny", "rows": ["one"]}, headers=headers)
    again = client.post("/v1/batches", json={"model": "tiny", "rows": ["something else"]}, headers=headers)
    assert (made.status_code, again.status_code) == (201, 200)
    assert again.json()["batch_id"] == made.json()["batch_id"] != batch_id
    # Keys are scoped per owner: the same Idempotency-Key of another key is another batch.
    other = client.post("/v1/batches", json={"model": "tiny", "rows": ["one"]}, headers=headers | auth(keys["bob"]))
    assert other.status_code == 201 and other.json()["batch_id"] != made.json()["batch_id"]


def test_multipart_upload_with_the_cli_spellings(client, keys):
    response = client.post(
        "/v1/batches",
        files={"file": ("prompts.csv", b"prompt,seed\na lighthouse,1\na harbour,2\n", "text/csv")},
        data={"model": "tiny", "steps": "4", "name": "upload", "matrix": ["guidance=1,1.5"], "webhook_url": ""},
        headers=auth(keys["alice"]),
    )
    assert response.status_code == 201, response.text
    assert response.json()["total"] == 4  # two rows x two guidance values
    jobs = client.get(f"/v1/batches/{response.json()['batch_id']}/jobs", headers=auth(keys["alice"])).json()
    assert [job["prompt"] for job in jobs["data"]] == ["a lighthouse"] * 2 + ["a harbour"] * 2


def test_a_bad_row_is_422_naming_line_and_field_and_nothing_is_written(client, keys, snapshot):
    before = snapshot()
    bad_json = submit(client, keys["alice"], ["fine", "fine too", {"prompt": "x", "steps": "many"}])
    assert bad_json.status_code == 422
    assert bad_json.json() | {"error": None} == {
        "error": None,
        "source": "<rows>",
        "line": 3,
        "field": "steps",
        "message": "must be an integer (got 'many')",
    }
    assert "<rows>:3:steps" in bad_json.json()["error"]
    bad_file = client.post(
        "/v1/batches",
        files={"file": ("shop.jsonl", b'{"prompt": "ok"}\n{"prompt": "ok", "width": 65}\n')},
        data={"model": "tiny"},
        headers=auth(keys["alice"]),
    )
    assert bad_file.status_code == 422
    assert (bad_file.json()["source"], bad_file.json()["line"], bad_file.json()["field"]) == ("shop.jsonl", 2, "width")
    wrong_kind = client.post(
        "/v1/batches", files={"file": ("shop.xlsx", b"x")}, data={"model": "tiny"}, headers=auth(keys["alice"])
    )
    assert wrong_kind.status_code == 422 and wrong_kind.json()["field"] == "file"
    unknown_option = submit(client, keys["alice"], ["x"], stepz=4)
    assert unknown_option.status_code == 422 and unknown_option.json()["field"] == "stepz"
    assert snapshot() == before


def test_pages_of_batches_and_jobs_follow_their_cursors(client, keys):
    made = [submit(client, keys["bob"], [f"page {i} row {r}" for r in range(3)]).json()["batch_id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/batches", params=params, headers=auth(keys["bob"])).json()
        seen += [b["batch_id"] for b in page["data"]]
        assert len(page["data"]) <= 2
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]  # newest first, each once
    jobs, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"/v1/batches/{made[0]}/jobs", params=params, headers=auth(keys["bob"])).json()
        jobs += [job["index"] for job in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert jobs == [0, 1, 2]
    queued = client.get(f"/v1/batches/{made[0]}/jobs?state=queued", headers=auth(keys["bob"])).json()
    assert len(queued["data"]) == 3
    for bad in ("not-a-cursor", "@@@"):
        response = client.get("/v1/batches", params={"cursor": bad}, headers=auth(keys["bob"]))
        assert response.status_code == 422 and response.json()["field"] == "cursor"
    assert client.get("/v1/batches?limit=101", headers=auth(keys["bob"])).json()["field"] == "limit"


def test_another_keys_batch_is_404_on_every_route_and_an_admin_sees_everything(client, keys, services_env):
    batch_id = submit(client, keys["alice"], ["alice's own"]).json()["batch_id"]
    bob = auth(keys["bob"])
    for method, path in [
        ("GET", ""),
        ("GET", "/jobs"),
        ("GET", "/manifest"),
        ("GET", "/events"),
        ("POST", "/cancel"),
        ("POST", "/resume"),
        ("POST", "/retry"),
    ]:
        response = client.request(method, f"/v1/batches/{batch_id}{path}", headers=bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"error": f"no batch {batch_id!r}"}
    assert batch_id not in [b["batch_id"] for b in client.get("/v1/batches", headers=bob).json()["data"]]

    cli_batch = api.submit(["made on the CLI"], model="tiny").batch_id
    admin = auth(keys["admin"])
    listed = [b["batch_id"] for b in client.get("/v1/batches?limit=100", headers=admin).json()["data"]]
    assert {cli_batch, batch_id} <= set(listed)
    assert client.get(f"/v1/batches/{cli_batch}", headers=admin).status_code == 200
    assert client.get(f"/v1/batches/{cli_batch}", headers=auth(keys["alice"])).status_code == 404


def test_no_key_and_a_revoked_key_are_401(client, keys, app):
    assert client.get("/v1/batches").status_code == 401
    assert client.get("/v1/batches", headers={"Authorization": "Bearer lcmq_nonsense"}).status_code == 401
    assert client.get("/v1/batches", headers=auth(keys["alice"])).status_code == 200
    access.revoke_key(app.state.repo, keys["alice"]["name"])
    refused = client.get("/v1/batches", headers=auth(keys["alice"]))
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_cancel_then_manifest_streams_and_the_access_log_names_the_key_only(client, keys, caplog):
    alice = auth(keys["alice"])
    batch_id = submit(client, alice, [f"row {i}" for i in range(4)]).json()["batch_id"]
    with caplog.at_level(logging.INFO, logger="lcmq.http.access"):
        canceled = client.post(f"/v1/batches/{batch_id}/cancel?token=secret-in-query", headers=alice)
    assert canceled.status_code == 200 and canceled.json()["canceled"] == 4
    record = next(r for r in caplog.records if r.name == "lcmq.http.access")
    assert (record.method, record.path, record.status, record.key) == (  # type: ignore[attr-defined]
        "POST",
        f"/v1/batches/{batch_id}/cancel",
        200,
        keys["alice"]["name"],
    )
    assert "secret-in-query" not in caplog.text and alice["Authorization"].split()[1] not in caplog.text
    events = client.get(f"/v1/batches/{batch_id}/events", headers=alice)
    assert events.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in events.text and "id: 0.0.4.0.0" in events.text
    with client.stream("GET", f"/v1/batches/{batch_id}/manifest", headers=alice) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"] == "application/x-ndjson"
        assert streamed.read() == b""  # nothing succeeded: an empty manifest, not an error


def test_a_body_over_the_limit_is_413(services_env, monkeypatch, keys):
    from lcmq.http.app import create_app
    from lcmq.settings import reset_settings

    monkeypatch.setenv("LCMQ_API_MAX_BODY_MB", "0.01")
    reset_settings()
    with TestClient(create_app(run_background=False)) as client:
        rows = ["x" * 100] * 200
        response = client.post("/v1/batches", json={"model": "tiny", "rows": rows}, headers=auth(keys["alice"]))
    assert response.status_code == 413 and "LCMQ_API_MAX_BODY_MB" in response.json()["error"]


def test_readyz_is_200_then_503_naming_a_closed_broker(client, services_env, monkeypatch):
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
        "failing": [],
    }

    from lcmq.http.app import create_app
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    monkeypatch.setenv("LCMQ_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    reset_settings()
    get_app.cache_clear()
    with TestClient(create_app(run_background=False)) as broken:
        response = broken.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unready" and body["failing"] == ["broker"]
    assert body["checks"]["database"] == body["checks"]["storage"] == "ok"
    assert "cannot reach the broker" in body["checks"]["broker"]


def test_schedules_are_scoped_to_their_key(client, keys, tmp_path, services_env):
    # Over HTTP a catalog is an s3:// object (a key may not name the API machine's files).
    bucket, prefix = services_env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=services_env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key=f"{prefix}-catalogs/items.csv", Body=b"id,name\nsku-1,a chair\nsku-2,a lamp\n")
    local = tmp_path / "catalog.csv"
    local.write_text("id,name\nsku-1,a chair\n")
    body = {
        "name": f"shop-{free_port()}",
        "catalog": f"s3://{bucket}/{prefix}-catalogs/items.csv",
        "template": "a photo of {name}",
        "cron": "0 3 * * *",
        "model": "tiny",
        "steps": 4,
    }
    refused = client.post("/v1/schedules", json=body | {"catalog": str(local)}, headers=auth(keys["alice"]))
    assert refused.status_code == 422 and refused.json()["field"] == "catalog", refused.text
    added = client.post("/v1/schedules", json=body, headers=auth(keys["alice"]))
    assert added.status_code == 201, added.text
    assert added.json()["name"] == body["name"] and added.json()["model"] == "tiny"
    assert [s["name"] for s in client.get("/v1/schedules", headers=auth(keys["alice"])).json()] == [body["name"]]
    assert client.get("/v1/schedules", headers=auth(keys["bob"])).json() == []
    assert client.get(f"/v1/schedules/{body['name']}", headers=auth(keys["bob"])).status_code == 404
    assert client.post(f"/v1/schedules/{body['name']}/run", headers=auth(keys["bob"])).status_code == 404
    run = client.post(f"/v1/schedules/{body['name']}/run", headers=auth(keys["alice"]))
    assert run.status_code == 200, run.text
    assert run.json()["total"] == 2 and run.json()["items"]["new"] == 2
    unchanged = client.post(f"/v1/schedules/{body['name']}/run", headers=auth(keys["alice"])).json()
    assert unchanged["unchanged"] is True and unchanged["batch_id"] is None
    shown = client.get(f"/v1/schedules/{body['name']}", headers=auth(keys["alice"])).json()
    assert shown["last_batch"]["batch_id"] == run.json()["batch_id"]
    assert json.loads(json.dumps(shown))["catalog_items"]
