"""Security of the edge gateway against a live `lcmq api` process and moto S3: every check is a
real HTTP call, driven by a tiny edge client (httpx, and a PUT of bytes to the presigned URL).

A token claims only its profiles (403), acts only on jobs it holds (409), records only an
object whose bytes hash to what it says, reads no batch list or job (401), is fenced at once by
a revocation that hands its jobs to other workers, gets 413 for a large body, 429 over its
claim rate, and is paused (423) after K failed jobs in a row until `lcmq workertoken resume`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import httpx

from lcmq import access, api, workertokens
from lcmq.settings import get_settings
from lcmq.storage import storage_from_settings
from tests.support.api_server import start_api

GATEWAY_ENV = {
    "LCMQ_LEASE_S": "120",  # a released job comes back by the revocation, not by its lease running out
    "LCMQ_GATEWAY_MAX_BODY_KB": "64",
    "LCMQ_GATEWAY_MAX_FAILURES_IN_A_ROW": "2",
    "LCMQ_GATEWAY_CLAIMS_PER_S": "3",
}


class Edge:
    """An edge worker reduced to its protocol: one token, one node."""

    def __init__(self, url: str, token: str, node: str = "n1"):
        self.node = node
        self.http = httpx.Client(base_url=f"{url}/gateway/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def post(self, route: str, **body: Any) -> httpx.Response:
        return self.http.post(route, json={"node": self.node, **body})

    def hello(self, profile: str = "tiny") -> httpx.Response:
        return self.post("/hello", host="box", pid=1, profile=profile, device="cpu", batch_size=2)

    def claim(self, max_jobs: int = 1, profile: str = "tiny", wait_s: float = 0) -> httpx.Response:
        return self.post("/claim", profile=profile, max_jobs=max_jobs, wait_s=wait_s)

    def jobs(self, max_jobs: int = 1) -> list[dict[str, Any]]:
        response = self.claim(max_jobs)
        assert response.status_code == 200, response.text
        return response.json()["jobs"]

    @staticmethod
    def upload(job: dict[str, Any], data: bytes) -> str:
        upload = job["upload"]
        response = httpx.request(upload["method"], upload["url"], content=data, headers=upload["headers"], timeout=30)
        assert response.status_code == 200, response.text
        return hashlib.sha256(data).hexdigest()

    def record(self, job: dict[str, Any], sha256: str, key: str | None = None) -> httpx.Response:
        result = {"job_id": job["job_id"], "key": key or job["key"], "sha256": sha256, "render_ms": 5.0}
        return self.post("/record", results=[result | {"batch_size": 1, "warning": None}])


def job_row(job_id: str):
    return {job.id: job for job in api.repository().jobs_by_id([job_id])}[job_id]


def test_a_token_acts_only_on_what_it_holds_and_a_revocation_fences_it(isolated_env, procs, cli):
    env = isolated_env | GATEWAY_ENV
    server = start_api(procs, env)
    repo = api.repository()
    a = workertokens.create_token(repo, "box-a", ["tiny"], 0.4)
    b = workertokens.create_token(repo, "box-b", ["tiny"])
    batch = api.submit([f"a red fox {i}" for i in range(4)], model="tiny")
    edge_a, edge_b = Edge(server.url, a.token), Edge(server.url, b.token)

    # Credentials do not cross: an API key is nothing here, a worker token nothing on /v1.
    api_key = access.create_key(repo, "shop").key
    assert Edge(server.url, api_key).hello().status_code == 401
    for path in ("/v1/batches", f"/v1/batches/{batch.batch_id}", f"/v1/batches/{batch.batch_id}/jobs"):
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {a.token}"}).status_code == 401

    # Only its profiles.
    assert edge_a.hello("sd15").status_code == 403
    assert edge_a.claim(profile="sd15").status_code == 403
    hello = edge_a.hello()
    assert hello.status_code == 200 and hello.json()["worker"] == "edge/box-a/n1"
    row = repo.worker_row("edge/box-a/n1")
    assert row is not None and (row.profile, row.cost_per_hour, row.stopped_at) == ("tiny", 0.4, None)

    [job] = edge_a.jobs(1)
    assert (job["batch_id"], job["index"], job["prompt"]) == (batch.batch_id, 0, "a red fox 0")
    assert job["key"] == f"{batch.batch_id}/000000.png" and job["output"] == {"format": "png", "quality": None}
    assert job_row(job["job_id"]).worker == "edge/box-a/n1"

    # Another token cannot touch a job box-a holds.
    assert edge_b.record(job, "0" * 64).status_code == 409
    assert edge_b.post("/renew", job_ids=[job["job_id"]]).json() == {"renewed": []}
    assert edge_b.post("/fail", job_ids=[job["job_id"]], error="x").json()["failed"] == 0
    assert edge_b.post("/handback", job_ids=[job["job_id"]], error=None).json() == {"released": 0}
    assert job_row(job["job_id"]).state == "running"

    # A record is only for the object it uploaded, at its job's key, with its real sha256.
    digest = edge_a.upload(job, b"\x89PNG pretend image bytes")
    wrong = edge_a.record(job, hashlib.sha256(b"other bytes").hexdigest())
    assert wrong.status_code == 200
    assert wrong.json() == {"recorded": [], "refused": [{"job_id": job["job_id"], "reason": "sha256 mismatch"}]}
    other_key = edge_a.record(job, digest, key=f"{batch.batch_id}/000001.png").json()
    assert other_key["recorded"] == [] and "wrong key" in other_key["refused"][0]["reason"]
    assert job_row(job["job_id"]).state == "running"  # still held: a retry may follow
    assert edge_a.post("/renew", job_ids=[job["job_id"]]).json() == {"renewed": [job["job_id"]]}
    assert edge_a.record(job, digest).json() == {"recorded": [job["job_id"]], "refused": []}
    assert edge_a.record(job, digest).json()["recorded"] == [job["job_id"]]  # a retry after a lost answer
    done = job_row(job["job_id"])
    assert (done.state, done.sha256, done.worker) == ("succeeded", digest, "edge/box-a/n1")
    assert storage_from_settings(get_settings()).read_sha256(job["key"], 1 << 20) == digest

    # A large body is refused before it is read.
    big = edge_a.post("/record", results=[], padding="x" * (65 << 10))
    assert big.status_code == 413 and "LCMQ_GATEWAY_MAX_BODY_KB" in big.json()["error"]

    assert edge_a.post("/heartbeat", images=1, render_s=0.5, load_s=2.0).json() == {"ok": True}
    assert repo.worker_row("edge/box-a/n1").images == 1

    # Revocation: the next call is 401 and the jobs box-a held are box-b's to claim at once.
    held = {j["job_id"] for j in edge_a.jobs(2)}
    revoked = cli(env, "workertoken", "revoke", "box-a")
    assert revoked.returncode == 0 and "2 running job(s) released" in revoked.stderr, revoked.stderr
    assert edge_a.claim().status_code == 401
    assert edge_a.post("/renew", job_ids=sorted(held)).status_code == 401
    taken = {j["job_id"] for j in edge_b.jobs(3)}
    assert held <= taken and len(taken) == 3
    assert {job_row(job_id).worker for job_id in taken} == {"edge/box-b/n1"}

    assert edge_b.hello().status_code == 200
    assert edge_b.post("/stopped").json() == {"ok": True}
    assert repo.worker_row("edge/box-b/n1").stopped_at is not None


def test_failures_pause_a_token_until_resumed_claims_are_rate_limited_and_long_polled(isolated_env, procs, cli):
    env = isolated_env | GATEWAY_ENV
    server = start_api(procs, env)
    repo = api.repository()
    flaky = Edge(server.url, workertokens.create_token(repo, "flaky", ["tiny"]).token)
    api.submit([f"a blue owl {i}" for i in range(3)], model="tiny")

    # K = 2 failed jobs in a row pause the token: 423 naming the command that resumes it.
    jobs = flaky.jobs(2)
    failed = flaky.post("/fail", job_ids=[job["job_id"] for job in jobs], error="CUDA error: out of memory")
    assert failed.json() == {"failed": 2, "paused": True}
    assert job_row(jobs[0]["job_id"]).error == "edge worker: CUDA error: out of memory"
    paused = flaky.claim()
    assert paused.status_code == 423 and "lcmq workertoken resume flaky" in paused.json()["error"]
    assert flaky.hello().status_code == 423
    assert workertokens.token_record(repo, "flaky").state == "paused"
    assert cli(env, "workertoken", "resume", "flaky").returncode == 0
    [last] = flaky.jobs(1)
    assert last["prompt"] == "a blue owl 2"

    # Over the claim rate (3 a second, per token): 429 with Retry-After; another token is not held up.
    eager = Edge(server.url, workertokens.create_token(repo, "eager", ["tiny"]).token)
    answers = [eager.claim() for _ in range(10)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(r.headers["retry-after"].isdigit() for r in limited)
    assert {r.status_code for r in answers} == {200, 429}

    # Long-poll: an idle claim waits and returns the job submitted while it waits.
    patient = Edge(server.url, workertokens.create_token(repo, "patient", ["tiny"]).token)
    got: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: got.append(patient.claim(wait_s=20)))
    waiter.start()
    time.sleep(0.5)  # not an assertion: the claim is (most likely) waiting when the job arrives
    late = api.submit(["a late heron"], model="tiny")
    waiter.join(30)
    assert got and got[0].status_code == 200, got
    assert [job["batch_id"] for job in got[0].json()["jobs"]] == [late.batch_id]
    assert patient.claim(wait_s=0.6).json()["jobs"] == []  # nothing left: [] at the end of the wait
