"""The webhook outbox on real Postgres (and SQLite, embedded): one delivery per final batch even
with two writers racing, exclusive claims, signed attempts to a real receiver, retries recorded,
and a refused URL that never connects."""

from __future__ import annotations

import json
import socket
import threading
from datetime import timedelta

import pytest

from lcmq import access, api
from lcmq.access import Principal
from lcmq.repository import Repository, utcnow
from lcmq.settings import get_settings, reset_settings
from lcmq.webhooks import final_body, new_delivery_id, verify
from scheduler.webhooks import DeliveryLoop
from tests.support.webhook_receiver import WebhookReceiver

SHOP = Principal("shop", admin=False)


@pytest.fixture
def hook_env(services_env, own_pg_url, monkeypatch):
    """services_env with a database of this test's own (the outbox scan sees every batch) and
    loopback webhooks allowed."""
    env = services_env | {
        "LCMQ_DATABASE_URL": own_pg_url,
        "LCMQ_WEBHOOK_ALLOW_PRIVATE": "true",
        "LCMQ_WEBHOOK_BACKOFF_FIRST_S": "0.2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    return env


def secret_of(repo: Repository, name: str) -> str:
    secret = repo.webhook_secret(name)
    assert secret is not None
    return secret


def final_batch(url: str, prompt: str = "a red fox", principal: Principal = SHOP) -> str:
    """A batch with a webhook that is final at once (canceled before any worker saw it)."""
    batch_id = api.submit([prompt], model="null", webhook_url=url, principal=principal).batch_id
    api.cancel(batch_id)
    return batch_id


def queue(repo: Repository, limit: int = 100) -> list[str]:
    settings = get_settings()
    return repo.queue_final_webhooks(
        utcnow(), limit, retry_for_s=settings.webhook_retry_for_s, body_of=final_body, new_id=new_delivery_id
    )


def test_the_body_is_the_batch_as_listed_plus_the_event(hook_env):
    repo = api.repository()
    access.create_key(repo, "shop")
    batch_id = final_batch("http://127.0.0.1:9/hook")
    running = api.submit(["a blue owl"], model="null", webhook_url="http://127.0.0.1:9/hook", principal=SHOP)
    queued = queue(repo)
    assert len(queued) == 1  # the batch still queued gets none yet
    [(delivery, attempts)] = repo.webhook_deliveries(batch_id)
    assert repo.webhook_deliveries(running.batch_id) == []
    batch = repo.get_batch(batch_id)
    listed = api.batch_summary(batch, repo.state_counts(batch_id))
    assert json.loads(delivery.body) == {"event": "batch.final"} | listed
    assert list(json.loads(delivery.body)) == ["event", *listed]  # and in the same order
    assert listed == api.status(batch_id).to_dict() | {k: listed[k] for k in ("name", "profile", "created_at")}
    assert (delivery.state, delivery.attempts, attempts) == ("pending", 0, [])
    assert delivery.id.startswith("msg_") and delivery.owner == "shop"
    assert repo.get_batch(batch_id).webhook_queued_at is not None
    assert queue(repo) == []  # queued once


def test_a_webhook_needs_a_batch_made_with_a_key(hook_env):
    from lcmq.errors import InputError

    with pytest.raises(InputError) as refused:
        api.submit(["a red fox"], model="null", webhook_url="http://127.0.0.1:9/hook")
    assert refused.value.field == "webhook_url"


def test_two_writers_racing_queue_each_batch_once(hook_env):
    repo = api.repository()
    access.create_key(repo, "shop")
    batch_ids = {final_batch("http://127.0.0.1:9/hook", f"prompt {i}") for i in range(20)}
    start = threading.Barrier(2)
    results: list[list[str]] = [[], []]

    def writer(slot: int) -> None:
        start.wait()
        results[slot] = queue(Repository(hook_env["LCMQ_DATABASE_URL"]), limit=100)

    threads = [threading.Thread(target=writer, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not set(results[0]) & set(results[1])
    assert len(results[0]) + len(results[1]) == 20
    for batch_id in batch_ids:
        assert len(repo.webhook_deliveries(batch_id)) == 1


def test_a_claim_is_exclusive_until_it_runs_out(hook_env):
    repo = api.repository()
    access.create_key(repo, "shop")
    for i in range(10):
        final_batch("http://127.0.0.1:9/hook", f"prompt {i}")
    assert len(queue(repo)) == 10
    now = utcnow()
    start = threading.Barrier(2)
    claimed: list[set[str]] = [set(), set()]

    def sender(slot: int) -> None:
        start.wait()
        claimed[slot] = {d.id for d in Repository(hook_env["LCMQ_DATABASE_URL"]).claim_due_webhooks(now, 30, 10)}

    threads = [threading.Thread(target=sender, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not claimed[0] & claimed[1]
    assert len(claimed[0] | claimed[1]) == 10
    assert repo.claim_due_webhooks(now, 30, 10) == []  # held
    later = now + timedelta(seconds=31)  # the holder died: its claims ran out
    assert len(repo.claim_due_webhooks(later, 30, 10)) == 10


def test_signed_attempts_a_500_is_retried_and_every_attempt_is_kept(hook_env):
    repo = api.repository()
    new = access.create_key(repo, "shop")
    with WebhookReceiver(status=500) as receiver:
        batch_id = final_batch(receiver.url)
        loop = DeliveryLoop(get_settings(), repo)
        assert loop.run_once() == 1
        [(delivery, attempts)] = repo.webhook_deliveries(batch_id)
        assert (delivery.state, delivery.attempts, attempts[0].status_code, attempts[0].error) == (
            "pending",
            1,
            500,
            "HTTP 500",
        )
        assert delivery.next_attempt_at is not None and delivery.claimed_until is None
        receiver.status = 200
        retried = repo.claim_due_webhooks(delivery.next_attempt_at, 30, 10)
        assert [d.id for d in retried] == [delivery.id]
        loop.attempt(retried[0])
        loop.stop()
    [(delivery, attempts)] = repo.webhook_deliveries(batch_id)
    assert (delivery.state, [a.status_code for a in attempts]) == ("delivered", [500, 200])
    assert delivery.delivered_at is not None
    assert len(receiver.received) == 2
    first, second = receiver.received
    assert first.body == second.body == delivery.body.encode()
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.id
    assert first.headers["content-type"] == "application/json"
    assert all(verify(new.webhook_secret, r.headers, r.body) for r in receiver.received)
    assert not verify(secret_of(repo, "shop"), second.headers, second.body + b" ")
    assert json.loads(second.body)["canceled"] == 1


def test_a_refused_url_is_recorded_and_never_connected(hook_env, monkeypatch):
    repo = api.repository()
    access.create_key(repo, "shop")
    batch_id = final_batch("http://169.254.169.254/latest/meta-data")  # allowed at submit here
    queue(repo)
    strict = get_settings().model_copy(update={"webhook_allow_private": False})
    loop = DeliveryLoop(strict, repo)
    [due] = repo.claim_due_webhooks(utcnow(), 30, 10)
    connects: list[object] = []

    def no_connect(sock, address):
        connects.append(address)
        raise AssertionError(f"the sender connected to {address}")

    # Python sockets only: the database goes through libpq's own sockets.
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    result = loop.attempt(due)
    monkeypatch.undo()
    loop.stop()
    assert connects == []
    assert result.status_code is None and result.error.startswith("refused: webhook_url host '169.254.169.254'")
    [(delivery, attempts)] = repo.webhook_deliveries(batch_id)
    assert delivery.state == "pending" and attempts[0].error == result.error


def test_embedded_sqlite_queues_claims_and_delivers(embedded_env, monkeypatch):
    monkeypatch.setenv("LCMQ_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings()
    repo = api.repository()
    new = access.create_key(repo, "shop")
    with WebhookReceiver() as receiver:
        batch_id = final_batch(receiver.url)
        loop = DeliveryLoop(get_settings(), repo)
        assert loop.run_once() == 1
        assert loop.run_once() == 0  # queued once, delivered once
        loop.stop()
    [(delivery, attempts)] = repo.webhook_deliveries(batch_id)
    assert (delivery.state, [a.status_code for a in attempts]) == ("delivered", [200])
    [received] = receiver.received
    assert verify(new.webhook_secret, received.headers, received.body)
