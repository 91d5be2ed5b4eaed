"""The gateway adapters of the worker's ports (worker/ports.py): an edge worker on a machine the
farm does not trust reaches jobs and objects only through the API process's /gateway/v1 routes
(the protocol: docs/edge.md), with one worker token and the presigned URLs the claims carry.

- `GatewayClient`: JSON over HTTP(S) with the token; a refused call raises `GatewayRefused`
  (permanent: 401 revoked, 403, 423 paused, 4xx), a gateway that is away, 5xx or 429 raises
  `GatewayUnavailable` (transient). `call_patiently` retries transient faults with capped,
  jittered backoff until a deadline.
- `GatewayJobStore`: claim by profile (long-poll), renew (the jobs left out are dropped by the
  ledger), record (retried until acknowledged: the key is deterministic and the gateway's
  record idempotent), fail, hand back.
- `GatewayObjectStore`: uploads to each job's presigned PUT, reads init images from presigned GETs.
The token is sent in a header only; it is never logged nor put in an error message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from lcmq.errors import PermanentError, PermanentStorageError, StorageError, TransientError
from lcmq.repository import BatchRecord, HandBack, JobRecord, StoredImage, utcnow
from lcmq.storage import check_key

log = logging.getLogger("lcmq.worker")

PREFIX = "/gateway/v1"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0  # a farm of edge workers waiting for a gateway must not retry in lockstep
REQUEST_TIMEOUT_S = 30.0
RECORD_PATIENCE_S = 600.0  # how long a rendered, uploaded image waits for the gateway to record it
SETTLE_PATIENCE_S = 60.0  # fail and hand back: after that the leases run out, which settles them too
UPLOAD_ATTEMPTS = 3
URLS_KEPT = 4096  # presigned URLs of inputs remembered (most recent claims)


class GatewayUnavailable(TransientError):
    """The gateway is away, overloaded (5xx) or rate-limiting (429): try again after a backoff."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GatewayRefused(PermanentError):
    """The gateway answered no (4xx): retrying the same call cannot help."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def backoff_s(attempt: int) -> float:
    """Full jitter over an exponential ceiling capped at BACKOFF_MAX_S (attempt 0 is the first retry)."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt))


def shown_url(url: str) -> str:
    """A presigned URL without its query (the signature): what logs and job errors may show."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("error") or body.get("detail") or body)[:500] if isinstance(body, dict) else str(body)[:500]


class GatewayClient:
    """The gateway's routes, as one edge worker (`node`) holding one token."""

    def __init__(self, url: str, token: str, node: str, *, timeout_s: float = REQUEST_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.node = node
        self._http = httpx.Client(
            base_url=self.url + PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        )

    def close(self) -> None:
        self._http.close()

    def call(self, route: str, body: dict[str, Any], *, accept: Sequence[int] = (200,), timeout_s: float | None = None):
        """One request; the JSON answer for an accepted status."""
        payload = {"node": self.node, **body}
        try:
            timeout = httpx.Timeout(timeout_s, connect=10.0) if timeout_s is not None else self._http.timeout
            response = self._http.post(route, json=payload, timeout=timeout)
        except httpx.HTTPError as exc:  # no answer: connection refused or reset, a timeout
            raise GatewayUnavailable(f"gateway {self.url} unreachable ({route}): {type(exc).__name__}") from exc
        if response.status_code in accept:
            return response.json()
        message = f"gateway {route}: {response.status_code} {_error_text(response)}"
        if response.status_code == 429 or response.status_code >= 500:
            raise GatewayUnavailable(message, _retry_after(response))
        raise GatewayRefused(response.status_code, message)

    def call_patiently(
        self, route: str, body: dict[str, Any], *, patience_s: float, accept: Sequence[int] = (200,)
    ) -> Any:
        """The call, retried through transient faults with backoff for up to `patience_s`."""
        deadline = time.monotonic() + patience_s
        attempt = 0
        while True:
            try:
                return self.call(route, body, accept=accept)
            except GatewayUnavailable as exc:
                delay = max(backoff_s(attempt), exc.retry_after_s or 0.0)
                if time.monotonic() + delay > deadline:
                    raise
                if attempt == 0 or attempt % 10 == 0:
                    log.warning("gateway unavailable, retrying", extra={"route": route, "error": str(exc)})
                attempt += 1
                time.sleep(delay)


# --- what a claim returns -------------------------------------------------------------------------


def batch_of(edge_job: dict[str, Any], profile: str) -> BatchRecord:
    """What encoding a job needs of its batch: the output format and the profile's name."""
    output = edge_job["output"]
    now = utcnow()
    return BatchRecord(
        id=edge_job["batch_id"],
        name=None,
        profile=profile,
        total=0,
        seed=0,
        output="",
        options={"image_format": output["format"], "quality": output.get("quality")},
        created_at=now,
        idempotency_key=None,
        priority=0,
        canceled_at=None,
        published_at=None,
        manifest_at=None,
    )


def job_of(edge_job: dict[str, Any], worker: str) -> JobRecord:
    """The job as the render loop knows it. Inputs are named by their presigned URLs: a LoRA's
    (the adapter cache downloads it once per object), an init image's without its signature
    (the object store keeps the URL: job errors then never carry one)."""
    loras = edge_job.get("loras")
    init_url = edge_job.get("init_image_url")
    return JobRecord(
        id=edge_job["job_id"],
        batch_id=edge_job["batch_id"],
        index=edge_job["index"],
        state="running",
        prompt=edge_job["prompt"],
        negative_prompt=edge_job.get("negative_prompt") or "",
        seed=edge_job["seed"],
        steps=edge_job["steps"],
        guidance=edge_job["guidance"],
        width=edge_job["width"],
        height=edge_job["height"],
        meta=edge_job.get("metadata") or {},
        attempts=edge_job["attempts"],
        worker=worker,
        error=None,
        key=edge_job["key"],
        sha256=None,
        render_ms=None,
        batch_size=None,
        warning=None,
        dispatched_at=None,
        created_at=utcnow(),
        started_at=None,
        finished_at=None,
        render_key=edge_job.get("render_key"),
        loras=[{"name": lora["name"], "weight": lora["weight"], "path": lora["url"]} for lora in loras]
        if loras
        else None,
        init_image=shown_url(init_url) if init_url else None,
        strength=edge_job.get("strength"),
    )


@dataclass(frozen=True)
class Claimed:
    job: JobRecord
    batch: BatchRecord


# --- the adapters -------------------------------------------------------------------------------


class GatewayObjectStore:
    """Objects through presigned URLs: one PUT per job key, GETs of the inputs a claim named."""

    def __init__(self, timeout_s: float = REQUEST_TIMEOUT_S):
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))
        self._uploads: dict[str, dict[str, Any]] = {}  # key -> the claim's upload {url, headers}
        self._inputs: OrderedDict[str, str] = OrderedDict()  # shown URL -> presigned URL
        self._lock = threading.Lock()

    def learn(self, edge_job: dict[str, Any]) -> None:
        """Remember a claimed job's presigned URLs (a later claim of the same job brings fresh ones)."""
        with self._lock:
            self._uploads[edge_job["key"]] = edge_job["upload"]
            if url := edge_job.get("init_image_url"):
                self._inputs[shown_url(url)] = url
                self._inputs.move_to_end(shown_url(url))
                while len(self._inputs) > URLS_KEPT:
                    self._inputs.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._uploads.pop(key, None)

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        """PUT to the key's presigned URL, with the headers it was signed with (metadata: the
        gateway vouches for the object by its sha256, read back at record)."""
        with self._lock:
            upload = self._uploads.get(key)
        if upload is None:
            raise PermanentStorageError(f"no upload URL for {key!r}: the job was not claimed by this worker")
        headers = dict(upload.get("headers") or {"Content-Type": content_type})
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                response = self._http.request(upload.get("method", "PUT"), upload["url"], content=data, headers=headers)
            except httpx.HTTPError as exc:
                failure: Exception = StorageError(f"upload of {key!r} failed: {type(exc).__name__}")
            else:
                if response.status_code < 300:
                    return
                if response.status_code == 403:  # the URL ran out: the job is claimed again with a new one
                    raise StorageError(f"upload of {key!r} refused (403): its presigned URL expired")
                if response.status_code < 500:
                    raise PermanentStorageError(f"upload of {key!r} refused: {response.status_code}")
                failure = StorageError(f"upload of {key!r} failed: {response.status_code}")
            if attempt + 1 < UPLOAD_ATTEMPTS:
                time.sleep(backoff_s(attempt))
        raise failure

    def stored_sha256(self, key: str) -> str | None:
        """Unknown: a presigned PUT cannot look. Keys are deterministic, so uploading the same
        bytes again is harmless (the gateway reads the object back before it records)."""
        return None

    def job_image_key(self, job_key: str | None, batch_id: str, index: int, ext: str) -> str:
        if not job_key:  # every edge job carries the key its upload URL was signed for
            raise PermanentStorageError(f"job {batch_id}/{index} came without an object key")
        return check_key(job_key)

    def read(self, url: str) -> bytes:
        """An init image, by its shown URL (or a presigned one)."""
        with self._lock:
            presigned = self._inputs.get(url, url)
        return fetch(self._http, presigned)


def fetch(http: httpx.Client, presigned: str) -> bytes:
    """GET a presigned URL: transient for 5xx and no answer, permanent for 4xx."""
    shown = shown_url(presigned)
    try:
        response = http.get(presigned)
    except httpx.HTTPError as exc:
        raise StorageError(f"{shown} cannot be read: {type(exc).__name__}") from exc
    if response.status_code >= 500:
        raise StorageError(f"{shown} cannot be read: {response.status_code}")
    if response.status_code >= 300:
        raise PermanentStorageError(f"{shown} cannot be read: {response.status_code}")
    return response.content


class GatewayJobStore:
    """Jobs through the gateway, as the edge worker the gateway named at hello."""

    def __init__(self, client: GatewayClient, worker: str, objects: GatewayObjectStore, profile: str):
        self.client = client
        self._worker = worker
        self.objects = objects
        self.profile = profile

    @property
    def worker(self) -> str:
        return self._worker

    def claim_next(self, max_jobs: int, wait_s: float) -> list[Claimed]:
        """Up to max_jobs jobs of this worker's profile, waiting up to wait_s for the first
        (one attempt: the caller backs off)."""
        answer = self.client.call(
            "/claim",
            {"profile": self.profile, "max_jobs": max_jobs, "wait_s": wait_s},
            timeout_s=wait_s + REQUEST_TIMEOUT_S,
        )
        claimed = []
        for edge_job in answer["jobs"]:
            self.objects.learn(edge_job)
            claimed.append(Claimed(job_of(edge_job, self.worker), batch_of(edge_job, self.profile)))
        return claimed

    def claim(self, job_ids: Sequence[str], lease_s: float, max_attempts: int | None = None) -> list[JobRecord]:
        raise PermanentError("an edge worker claims by profile (claim_next), never by job ids")

    def renew(self, job_ids: Sequence[str], lease_s: float) -> set[str] | None:
        return set(self.client.call("/renew", {"job_ids": list(job_ids)})["renewed"])

    def record(self, stored: Sequence[StoredImage]) -> int:
        """Retried until the gateway answers (it may be away for a while): an image it did not
        acknowledge is never given up while its lease may still hold."""
        if not stored:
            return 0
        results = [
            {
                "job_id": image.job_id,
                "key": image.key,
                "sha256": image.sha256,
                "render_ms": image.render_ms,
                "batch_size": image.batch_size,
                "warning": image.warning,
            }
            for image in stored
        ]
        answer = self.client.call_patiently(
            "/record", {"results": results}, patience_s=RECORD_PATIENCE_S, accept=(200, 409)
        )
        for refused in answer.get("refused", []):
            log.warning("record refused", extra={"job_id": refused.get("job_id"), "reason": refused.get("reason")})
        for image in stored:
            self.objects.forget(image.key)
        return len(answer.get("recorded", []))

    def fail(self, job_ids: Sequence[str], reason: str) -> int:
        answer = self.client.call_patiently(
            "/fail", {"job_ids": list(job_ids), "error": reason[:4000]}, patience_s=SETTLE_PATIENCE_S
        )
        return int(answer.get("failed", 0))

    def hand_back(self, job_ids: Sequence[str], reason: str | None, max_handbacks: int) -> HandBack:
        """Back to the queue at once (the gateway applies max_handbacks: its settings)."""
        if not job_ids:
            return HandBack([], [], 0)
        answer = self.client.call_patiently(
            "/handback",
            {"job_ids": list(job_ids), "error": reason[:4000] if reason else None},
            patience_s=SETTLE_PATIENCE_S,
        )
        released = int(answer.get("released", 0))
        log.info("jobs handed back", extra={"jobs": len(job_ids), "released": released})
        return HandBack(list(job_ids)[:released], [], 0)

    def requeue(self, batch: BatchRecord, job_ids: Sequence[str], countdown_s: float) -> None:
        """Nothing to publish: queued jobs are claimed by profile (the sweeper sends the Celery
        workers' messages for handed-back jobs)."""

    def batch_stored(self, batch: BatchRecord) -> None:
        """The gateway writes a finished batch's manifest when it records its last job."""
