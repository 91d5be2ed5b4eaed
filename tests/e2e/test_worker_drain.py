"""A canceled batch never holds up the queue: a worker drains its messages quickly, on both
brokers, and a batch submitted after it renders at once."""

from __future__ import annotations

import time

import pytest

from bench.harness import done, wait_until, write_prompts
from lcmq import api
from lcmq.queue import queue_length

CANCELED_BATCHES, JOBS_EACH = 2, 1000
# Before: the filesystem broker took one message a second, and every message cost a claim round
# trip per micro-batch (32 of them at one image a call) on both brokers: 2 x 1,000 canceled jobs
# held a later batch back for 20-30 s. Now a few seconds.
DRAIN_BOUND_S = 6


@pytest.fixture(params=["filesystem", "redis"])
def broker_env(request):
    """The embedded default (SQLite, filesystem broker) or Postgres + a Redis of this test's own."""
    if request.param == "redis":
        return request.getfixturevalue("isolated_env") | {"LCMQ_CHUNK_SIZE": "32"}
    env = request.getfixturevalue("embedded_env")
    from lcmq.migrate import upgrade

    upgrade(api.repository().url)  # the embedded SQLite file
    return env


def test_canceled_batches_drain_quickly_and_a_later_batch_renders(broker_env, procs, tmp_path, monkeypatch):
    monkeypatch.setenv("LCMQ_CHUNK_SIZE", "32")
    from lcmq.settings import reset_settings

    reset_settings()
    for n in range(CANCELED_BATCHES):
        prompts = write_prompts(tmp_path / f"canceled-{n}.jsonl", JOBS_EACH)
        api.cancel(api.submit(prompts, model="null").batch_id)
    messages = queue_length("null")
    assert messages >= 2 * CANCELED_BATCHES  # chunks of at most 32 jobs, a few a batch at least

    procs(broker_env | {"LCMQ_BATCH_SIZE": "1"}, "worker", "--model", "null").wait_ready()
    started = time.monotonic()
    later = api.submit(write_prompts(tmp_path / "later.jsonl", 4), model="null").batch_id
    wait_until(lambda: done(later), 120, interval_s=0.1, what="the later batch")
    took_s = time.monotonic() - started
    print(f"\n{broker_env.get('LCMQ_BROKER_URL', 'filesystem')}: {messages} canceled messages drained and a "
          f"later batch rendered in {took_s:.1f} s ({messages / took_s:.1f} messages/s)")
    assert api.status(later).succeeded == 4
    assert took_s < DRAIN_BOUND_S, f"{messages} canceled messages took {took_s:.1f} s"
