"""The lease ledger (worker/leases.py) and how the store pipeline settles a fault, on real
Postgres and Redis: one heartbeat that stops, hand-backs that end, backoffs that grow."""

from __future__ import annotations

import json
import random
import threading
import time
from itertools import pairwise

import pytest
import redis
from helpers import create_test_batch
from PIL import Image

from lcmq.errors import DatabaseError, QueryError
from lcmq.repository import Repository
from lcmq.settings import get_settings
from worker.direct import DirectJobStore, DirectObjectStore
from worker.leases import LeaseLedger, handback_delay_s
from worker.store import StoreContext, StorePipeline

TASK = object()  # a holder: what a task (a ChunkRun) is to the ledger


@pytest.fixture
def repo(migrated_pg_url):
    return Repository(migrated_pg_url)


@pytest.fixture
def broker(monkeypatch, redis_url, tmp_path):
    """Publishing goes to this session's Redis database; returns a client to read the messages."""
    from lcmq.queue import get_app
    from lcmq.settings import reset_settings

    monkeypatch.setenv("LCMQ_BROKER_URL", redis_url)
    monkeypatch.setenv("LCMQ_HOME", str(tmp_path / ".lcmq"))
    reset_settings()
    get_app.cache_clear()
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
    monkeypatch.undo()
    reset_settings()
    get_app.cache_clear()


def _batch(repo: Repository, n: int = 1) -> tuple[str, list[str]]:
    return create_test_batch(repo, n)


def _context(repo: Repository, storage, batch) -> StoreContext:
    """The direct adapters as a Celery worker named "w" has them."""
    return StoreContext(
        DirectJobStore(repo, "w", storage), DirectObjectStore(storage, get_settings()), batch, max_handbacks=3
    )


def _heartbeats() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "lcmq-heartbeat"]


# --- the ledger ---------------------------------------------------------------------------------


def test_one_heartbeat_renews_what_is_held_until_it_is_stopped(repo):
    _, job_ids = _batch(repo, 2)
    before = len(_heartbeats())
    ledger = LeaseLedger(lease_s=0.6).start()
    assert [job.id for job in ledger.claim(DirectJobStore(repo, "w"), job_ids, TASK)] == job_ids
    assert ledger.held_by(TASK) == job_ids and len(_heartbeats()) == before + 1
    time.sleep(1.2)  # twice the lease: only the heartbeat keeps the jobs this worker's
    assert repo.claim(job_ids, "thief", lease_s=60) == []
    ledger.stop()
    assert not ledger.beating and len(_heartbeats()) == before
    time.sleep(0.8)  # nothing renews them now: the leases run out
    assert len(repo.claim(job_ids, "next", lease_s=60)) == 2


def test_claim_hold_settle_drop(repo):
    batch_id, job_ids = _batch(repo, 3)
    store = object()
    with LeaseLedger(lease_s=60) as ledger:
        ledger.claim(DirectJobStore(repo, "w"), job_ids, TASK)
        ledger.hold(DirectJobStore(repo, "w"), job_ids[:2], store)  # the task hands a micro-batch to the store pipeline
        assert (ledger.held_by(TASK), ledger.held_by(store)) == (job_ids[2:], job_ids[:2])
        assert ledger.fail(job_ids[:2], "bad") == 2
        assert ledger.hand_back(job_ids[2:], "s3 down", max_handbacks=5).requeued == job_ids[2:]
        assert ledger.count() == 0
    assert [job.state for job in repo.jobs(batch_id)] == ["failed", "failed", "queued"]


def test_a_settle_the_database_refuses_still_drops_the_lease(repo):
    _, job_ids = _batch(repo, 1)
    with LeaseLedger(lease_s=60) as ledger:
        ledger.claim(DirectJobStore(repo, "w"), job_ids, TASK)
        with pytest.raises(Exception):  # noqa: B017 - Postgres text cannot hold a NUL byte
            ledger.fail(job_ids, "bad\x00reason")
        assert ledger.count() == 0  # not renewed forever: the lease runs out, the sweeper recovers it


def test_hand_back_delays_grow_with_the_hand_backs():
    random.seed(7)
    means = [sum(handback_delay_s(handbacks) for _ in range(400)) / 400 for handbacks in range(1, 7)]
    assert all(later > earlier * 1.5 for earlier, later in pairwise(means)), means
    assert max(handback_delay_s(30) for _ in range(400)) <= 120  # capped


# --- the store pipeline settles a fault: failed at once, or after max_handbacks -------------------


class RecordingFails(Repository):
    """A stub for a fault that cannot be caused from outside: every record of a success fails."""

    fault: Exception = DatabaseError("database error in record_successes: connection refused (stub)")

    def record_successes(self, results, worker):
        raise self.fault


def _store_once(store: StorePipeline, ctx: StoreContext, job_id: str):
    (job,) = store.leases.claim(ctx.jobs, [job_id], TASK)
    store.submit(ctx, [job], [Image.new("RGB", (64, 64))], [None], render_ms=1.0)
    (outcome,) = store.drain()
    return outcome


def _published(broker) -> list[dict]:
    messages = []
    for key in broker.keys("render.tiny*"):
        if broker.type(key) == b"list":
            messages += [json.loads(raw) for raw in broker.lrange(key, 0, -1)]
    return messages


@pytest.mark.parametrize(
    "fault, handbacks",
    [(DatabaseError("connection refused (stub)"), 3), (QueryError("syntax error at or near (stub)"), 0)],
)
def test_a_storing_fault_ends_with_the_job_failed(migrated_pg_url, broker, tmp_path, fault, handbacks):
    from lcmq.storage import FileStorage

    stub = RecordingFails(migrated_pg_url)
    stub.fault = fault
    batch_id, (job_id,) = _batch(stub)
    ctx = _context(stub, FileStorage(tmp_path / "renders"), stub.get_batch(batch_id))
    with LeaseLedger(lease_s=60) as ledger:
        store = StorePipeline(ledger)
        outcomes = [_store_once(store, ctx, job_id) for _ in range(handbacks + 1)]
        assert store.leases.count() == 0
        assert store.leases.claim(DirectJobStore(stub, "w"), [job_id], TASK) == []  # failed, not queued again
    transient = fault.transient
    assert [outcome.transient_error is not None for outcome in outcomes] == [transient] * (handbacks + 1)
    (job,) = stub.jobs(batch_id)
    assert job.state == "failed" and str(fault) in job.error
    if transient:
        assert job.error.endswith("handed back 3 times, giving up") and job.attempts == 1
    # one message per hand-back, each for that job, and none for a permanent fault
    messages = _published(broker)
    assert len(messages) == handbacks
    assert all(job_id in json.dumps(message) for message in messages)


def test_worker_shutdown_stops_the_store_pipelines_heartbeat(repo, tmp_path):
    """The heartbeat that renews the jobs being stored is stopped once they are drained (it was
    started with a bare __enter__() and never stopped)."""
    from lcmq.storage import FileStorage
    from worker.store import drain_on_exit, pipeline

    batch_id, (job_id,) = _batch(repo)
    store = pipeline(lease_s=60)
    ctx = _context(repo, FileStorage(tmp_path / "renders"), repo.get_batch(batch_id))
    (job,) = repo.claim([job_id], "w", lease_s=60)
    store.submit(ctx, [job], [Image.new("RGB", (64, 64))], [None], 1.0)
    drain_on_exit()
    try:
        assert repo.jobs(batch_id)[0].state == "succeeded"
        assert _heartbeats() == []
    finally:
        pipeline().leases.start()  # this test process goes on: other tests may store
