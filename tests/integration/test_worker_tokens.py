"""Worker tokens and the gateway's claim at the repository, on SQLite and Postgres: the claim's
order and profile, a Celery message for a job an edge worker holds is a no-op, revocation
releases the token's jobs in its own transaction (and only its own), the failure pause."""

from __future__ import annotations

import pytest

from lcmq import api, workertokens
from lcmq.errors import InputError, NotFoundError
from lcmq.models import JobState

LEASE_S, MAX_ATTEMPTS = 60.0, 3


@pytest.fixture(params=["embedded_env", "isolated_env"])
def repo(request):
    request.getfixturevalue(request.param)
    return api.repository()


def test_claim_next_takes_the_most_urgent_batch_first_and_celery_claims_find_it_taken(repo):
    low = api.submit([f"low {i}" for i in range(3)], model="tiny", priority=0)
    high = api.submit([f"high {i}" for i in range(2)], model="tiny", priority=7)
    edge = workertokens.edge_worker("box", "n1")

    first = repo.claim_next("tiny", 3, edge, LEASE_S, MAX_ATTEMPTS)
    assert [(job.batch_id, job.index) for job in first] == [(high.batch_id, 0), (high.batch_id, 1), (low.batch_id, 0)]
    assert {job.worker for job in first} == {edge} and {job.attempts for job in first} == {1}
    assert repo.claim_next("sd15", 5, edge, LEASE_S, MAX_ATTEMPTS) == []  # another profile's queue

    # The chunk message Celery workers get for these jobs: its claim takes none of them.
    assert repo.claim([job.id for job in first], "celery@host", LEASE_S, MAX_ATTEMPTS) == []
    rest = repo.claim_next("tiny", 10, edge, LEASE_S, MAX_ATTEMPTS)
    assert [(job.batch_id, job.index) for job in rest] == [(low.batch_id, 1), (low.batch_id, 2)]
    assert repo.claim_next("tiny", 10, edge, LEASE_S, MAX_ATTEMPTS) == []


def test_claim_next_leaves_jobs_with_local_files_to_celery_workers(repo, tmp_path):
    image = tmp_path / "init.png"
    image.write_bytes(b"not read here")
    local = api.submit([{"prompt": "img2img", "init_image": f"file://{image}", "strength": 0.5}], model="tiny")
    assert repo.claim_next("tiny", 5, "edge/box/n1", LEASE_S, MAX_ATTEMPTS) == []
    assert len(repo.claim([job.id for job in repo.jobs(local.batch_id)], "celery@host", LEASE_S)) == 1


def test_revoke_releases_only_its_own_jobs_at_once_and_fences_its_claims(repo):
    batch = api.submit([f"fox {i}" for i in range(4)], model="tiny")
    # "a_b" must not match "aXb" as a LIKE pattern would.
    tokens = {name: workertokens.create_token(repo, name, ["tiny"]) for name in ("a_b", "aXb")}
    mine = repo.claim_next("tiny", 2, workertokens.edge_worker("a_b", "n1"), LEASE_S, MAX_ATTEMPTS, token="a_b")
    other = repo.claim_next("tiny", 1, workertokens.edge_worker("aXb", "n1"), LEASE_S, MAX_ATTEMPTS, token="aXb")
    assert len(mine) == 2 and len(other) == 1

    assert workertokens.revoke_token(repo, "a_b") == 2
    assert workertokens.authenticate(repo, tokens["a_b"].token) is None
    assert workertokens.authenticate(repo, tokens["aXb"].token).name == "aXb"
    rows = {job.id: job for job in repo.jobs(batch.batch_id)}
    for job in mine:  # queued now, attempt kept, waiting for the sweeper's message
        assert (rows[job.id].state, rows[job.id].attempts, rows[job.id].lease_until) == ("queued", 1, None)
        assert rows[job.id].dispatched_at is None
    assert rows[other[0].id].state == JobState.running.value

    assert repo.claim_next("tiny", 5, "edge/a_b/n1", LEASE_S, MAX_ATTEMPTS, token="a_b") == []  # fenced
    again = repo.claim_next("tiny", 5, "edge/aXb/n1", LEASE_S, MAX_ATTEMPTS, token="aXb")
    assert len(again) == 3 and {job.id for job in mine} <= {job.id for job in again}  # others take them at once
    with pytest.raises(NotFoundError):
        workertokens.revoke_token(repo, "a_b")


def test_failures_in_a_row_pause_a_token_until_resumed(repo):
    api.submit(["a fox"], model="tiny")
    workertokens.create_token(repo, "flaky", ["tiny"], 0.25)
    assert not repo.count_token_failures("flaky", 2, pause_at=3)
    repo.reset_token_failures("flaky")  # a success between: the run starts again
    assert not repo.count_token_failures("flaky", 2, pause_at=3)
    assert repo.count_token_failures("flaky", 1, pause_at=3)
    record = workertokens.token_record(repo, "flaky")
    assert (record.state, record.failures_in_a_row, record.cost_per_hour) == ("paused", 3, 0.25)
    assert repo.claim_next("tiny", 1, "edge/flaky/n1", LEASE_S, MAX_ATTEMPTS, token="flaky") == []

    workertokens.resume_token(repo, "flaky")
    assert workertokens.token_record(repo, "flaky").state == "active"
    assert len(repo.claim_next("tiny", 1, "edge/flaky/n1", LEASE_S, MAX_ATTEMPTS, token="flaky")) == 1


def test_token_names_profiles_and_costs_are_checked(repo):
    with pytest.raises(InputError, match="NAME"):
        workertokens.create_token(repo, "no spaces", ["tiny"])
    with pytest.raises(InputError, match="--profiles.*'nope'"):
        workertokens.parse_profiles("tiny,nope")
    with pytest.raises(InputError, match="--cost-per-hour"):
        workertokens.create_token(repo, "neg", ["tiny"], -1.0)
    workertokens.create_token(repo, "once", ["tiny"])
    with pytest.raises(InputError, match="exists"):
        workertokens.create_token(repo, "once", ["tiny"])
    assert workertokens.authenticate(repo, "lcmq_an-api-key") is None
