"""API keys and the owner rule through the Python API: what the HTTP face relies on."""

from __future__ import annotations

import socket

import pytest

from lcmq import access, api
from lcmq.access import LOCAL, Principal
from lcmq.errors import InputError, NotFoundError
from lcmq.webhooks import signature, verify, webhook_url_problem


def test_a_key_is_stored_only_as_its_hash_and_a_revoked_key_authenticates_no_more(services_env):
    repo = api.repository()
    new = access.create_key(repo, "shop-a")
    assert new.key.startswith("lcmq_") and new.webhook_secret.startswith("whsec_")
    assert access.authenticate(repo, new.key) == Principal("shop-a", admin=False)
    assert access.authenticate(repo, new.key + "x") is None
    with repo.engine.connect() as conn:
        from sqlalchemy import text

        stored = conn.execute(text("SELECT * FROM api_keys WHERE name = 'shop-a'")).mappings().one()
    assert new.key not in {str(v) for v in stored.values()}
    with pytest.raises(InputError, match="exists"):
        access.create_key(repo, "shop-a")
    access.revoke_key(repo, "shop-a")
    assert access.authenticate(repo, new.key) is None
    with pytest.raises(NotFoundError):
        access.revoke_key(repo, "shop-a")
    with pytest.raises(InputError, match="NAME"):
        access.create_key(repo, "bad name")


def test_a_key_sees_only_its_own_batches_and_an_admin_sees_all(services_env):
    a, b = Principal("owner-a", admin=False), Principal("owner-b", admin=False)
    admin = Principal("root", admin=True)
    mine = api.submit(["a red fox"], model="null", principal=a)
    cli = api.submit(["a red fox"], model="null")
    assert mine.batch_id != cli.batch_id  # the same body from two owners: two batches
    assert api.status(mine.batch_id, a).batch_id == mine.batch_id
    for call in (api.status, api.cancel, api.resume, api.retry_failed, api.manifest):
        with pytest.raises(NotFoundError, match="no batch"):
            call(mine.batch_id, b)
    with pytest.raises(NotFoundError):
        api.status(cli.batch_id, a)
    assert api.status(cli.batch_id, admin).batch_id == cli.batch_id
    assert api.status(mine.batch_id, LOCAL).batch_id == mine.batch_id
    assert [row["batch_id"] for row in api.batches(principal=a)] == [mine.batch_id]
    assert api.batches(principal=b) == []
    assert {mine.batch_id, cli.batch_id} <= {row["batch_id"] for row in api.batches(principal=admin)}
    again = api.submit(["a red fox"], model="null", principal=a)
    assert (again.batch_id, again.resubmitted) == (mine.batch_id, True)


def test_batches_page_by_cursor_newest_first(services_env):
    owner = Principal("pager", admin=False)
    made = [api.submit([f"prompt {i}"], model="null", principal=owner).batch_id for i in range(5)]
    first = api.batches(limit=2, principal=owner)
    assert [row["batch_id"] for row in first] == made[::-1][:2]
    last = api.repository().get_batch(first[-1]["batch_id"])
    second = api.batches(limit=10, principal=owner, before=(last.created_at, last.id))
    assert [row["batch_id"] for row in second] == made[::-1][2:]


def test_webhook_urls_to_the_farms_own_network_are_refused_without_connecting(monkeypatch):
    # The check only resolves (here through a stub resolver): nothing may connect, to any address.
    def no_connect(sock, address):
        raise AssertionError(f"the URL check connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)

    def resolve(host: str, port: int) -> list[str]:
        return {"hooks.example": ["93.184.216.34"], "inside.example": ["10.0.0.5"]}[host]

    assert webhook_url_problem("https://hooks.example/x", False, resolve) is None
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest", "http://[::1]/", "https://inside.example/"):
        problem = webhook_url_problem(url, False, lambda h, p: resolve(h, p) if "example" in h else [h])
        assert problem and "internal address" in problem, url
    assert "http://" in webhook_url_problem("ftp://hooks.example/", False, resolve)
    assert webhook_url_problem("http://127.0.0.1:9/x", True, resolve) is None


def test_signature_is_the_standard_webhooks_one():
    # The example of the Standard Webhooks specification (its reference libraries' test vector).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    sig = signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330"}
    assert verify(secret, headers | {"webhook-signature": sig}, body)
    assert not verify(secret, headers | {"webhook-signature": sig}, body + b" ")


def test_a_key_names_s3_objects_only_never_files_of_the_api_machine(services_env, tmp_path):
    """Over HTTP, a row's init image, a LoRA and a schedule's catalog would otherwise make the API
    process read (or probe for) its own files."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for a tenant")
    key = Principal("tenant", admin=False)
    for row, field in (
        ({"prompt": "x", "init_image": str(secret)}, "init_image"),
        ({"prompt": "x", "init_image": f"file://{secret}"}, "init_image"),
        ({"prompt": "x", "loras": [{"name": "ink", "path": str(secret)}]}, "loras"),
    ):
        with pytest.raises(InputError, match="s3://") as refused:
            api.submit([row], model="tiny", principal=key)
        assert refused.value.field == field
    with pytest.raises(InputError, match="s3://") as refused:
        api.submit(["x"], model="tiny", loras=[{"name": "ink", "path": str(secret)}], principal=key)
    assert refused.value.field == "--lora"
    catalog = tmp_path / "items.csv"
    catalog.write_text("id,name\na,mug\n")
    with pytest.raises(InputError, match="s3://") as refused:
        api.schedule_add(
            "tenant-shop", catalog=str(catalog), template="{name}", cron="@daily", model="null", principal=key
        )
    assert refused.value.field == "catalog"
    # The local caller (the CLI) still may, and an s3:// init image is fine for a key.
    assert api.submit([{"prompt": "x", "init_image": str(secret)}], model="tiny").total == 1
    assert api.submit([{"prompt": "x", "init_image": "s3://bucket/a.png"}], model="tiny", principal=key).total == 1
