"""A canceled batch never holds up the queue: a worker drains its messages quickly, on both
brokers, and a batch submitted after it renders at once."""

from __future__ import annotations

import time

import pytest

from bench.harness import done, wait_until, write_prompts
from lcmq import api
from lcmq.queue import queue_length

CANCELED_BATCHES, JOBS_EACH, JOBS_A_MESSAGE = 2, 2500, 500
# Before, draining cost a second a message on the filesystem broker (its polling interval) and,
# on both brokers, a claim round trip per micro-batch of every canceled chunk (500 of them a
# message at one image a pipeline call): 10-30 s here. Now one claim a message: about a second.
DRAIN_BOUND_S = 5


@pytest.fixture(params=["filesystem", "redis"])
def broker_env(request):
    """The embedded default (SQLite, filesystem broker) or Postgres + a Redis of this test's own."""
    if request.param == "redis":
        return request.getfixturevalue("isolated_env")
    env = request.getfixturevalue("embedded_env")
    from lcmq.migrate import upgrade

    upgrade(api.repository().url)  # the embedded SQLite file
    return env


def test_canceled_batches_drain_quickly_and_a_later_batch_renders(broker_env, procs, tmp_path):
    for n in range(CANCELED_BATCHES):
        prompts = write_prompts(tmp_path / f"canceled-{n}.jsonl", JOBS_EACH)
        # A seed of its own: the same prompts and options would be the same batch, submitted once.
        api.cancel(api.submit(prompts, model="null", seed=n, chunk_size=JOBS_A_MESSAGE).batch_id)
    messages = queue_length("null")
    assert messages == CANCELED_BATCHES * JOBS_EACH // JOBS_A_MESSAGE

    procs(broker_env | {"LCMQ_BATCH_SIZE": "1"}, "worker", "--model", "null").wait_ready()
    started = time.monotonic()
    later = api.submit(write_prompts(tmp_path / "later.jsonl", 4), model="null").batch_id
    wait_until(lambda: done(later), 120, interval_s=0.1, what="the later batch")
    took_s = time.monotonic() - started
    jobs = CANCELED_BATCHES * JOBS_EACH
    print(
        f"\n{broker_env.get('LCMQ_BROKER_URL', 'filesystem')}: {messages} canceled messages ({jobs} jobs) "
        f"drained and a later batch rendered in {took_s:.1f} s ({messages / took_s:.1f} messages/s)"
    )
    assert api.status(later).succeeded == 4
    assert took_s < DRAIN_BOUND_S, f"{messages} canceled messages took {took_s:.1f} s"
