"""The webhook sender: queues each final batch's delivery and sends the due ones, signed.

`DeliveryLoop(settings).start()` runs it in a daemon thread, every `webhook_poll_s`: in every
`lcmq api` process and in `lcmq scheduler`, any number at once. The outbox rows make that safe:
a batch's delivery is queued once (Repository.queue_final_webhooks) and an attempt is sent by
the one sender that claimed it (Repository.claim_due_webhooks); a sender that dies mid-attempt
leaves a claim that runs out, and another sender sends again (delivery is at least once: the
`webhook-id` header stays the same, so a receiver can drop a repeat).

An attempt: the URL is checked again (a name may resolve elsewhere now; a refused URL fails the
attempt and nothing connects), the stored body is POSTed with the Standard Webhooks headers
signed with the batch's key's secret, and redirects are not followed. A 2xx delivers; anything
else waits a backoff (exponential, full jitter) and tries again until the delivery's give_up_at,
when it fails. Every attempt is recorded (`lcmq webhooks BATCH`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx

from lcmq.errors import LcmqError
from lcmq.repository import Repository, WebhookDeliveryRecord, utcnow
from lcmq.settings import Settings
from lcmq.webhooks import final_body, new_delivery_id, signature, webhook_url_problem

log = logging.getLogger("lcmq.webhooks")

SENDERS = 8  # attempts in flight per process: one slow receiver does not hold up the others
QUEUE_PAGE = 100  # final batches queued per turn
CLAIM_MARGIN_S = 10  # a claim outlives the attempt's timeout by this much (the write after it, clock skew)


def backoff_s(failures: int, first_s: float, max_s: float, draw: Callable[[], float] = random.random) -> float:
    """The wait after the `failures`-th failed attempt: full jitter, a uniform draw below
    first_s * 2^(failures-1) capped at max_s (5 s, 10 s, 20 s … 10 min by default), so many
    deliveries that failed together do not all come back together."""
    ceiling = min(max_s, first_s * 2 ** max(failures - 1, 0))
    return draw() * ceiling


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: float
    permanent: bool = False  # no later attempt can do better (nothing to sign with): give up now

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def signed_headers(secret: str, delivery_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, delivery_id, timestamp, body),
    }


def next_step(
    delivery: WebhookDeliveryRecord, result: AttemptResult, now: datetime, settings: Settings
) -> tuple[datetime | None, bool]:
    """(next attempt time, gave up) after a failed attempt: a backoff, but never past
    give_up_at (the last attempt is made then); at or after give_up_at, give up."""
    if result.delivered:
        return None, False
    if result.permanent or now >= delivery.give_up_at:
        return None, True
    wait = backoff_s(delivery.attempts + 1, settings.webhook_backoff_first_s, settings.webhook_backoff_max_s)
    return min(now + timedelta(seconds=wait), delivery.give_up_at), False


class DeliveryLoop:
    """Queue final batches' webhooks and send the due ones, in a daemon thread until stop()."""

    def __init__(self, settings: Settings, repo: Repository | None = None):
        self.settings = settings
        self.repo = repo or Repository(settings.database_url_resolved)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lcmq-webhooks", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="lcmq-webhook-send")
        self._client = httpx.Client(follow_redirects=False, timeout=settings.webhook_timeout_s)

    def start(self) -> DeliveryLoop:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5) -> None:
        """Stop taking work; attempts in flight finish (their claims run out if they cannot)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        log.info("webhook sender started", extra={"poll_s": self.settings.webhook_poll_s})
        while not self._stop.is_set():
            self._guarded(self.run_once)
            self._stop.wait(self.settings.webhook_poll_s)
        self._client.close()

    @staticmethod
    def _guarded(action: Callable[[], object]) -> None:
        """The loop outlives a failed turn (the database away): logged, tried at the next one."""
        try:
            action()
        except LcmqError as exc:
            log.warning("webhook turn failed", extra={"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the sender must not die with its API process alive
            log.exception("webhook turn failed unexpectedly", extra={"error": f"{type(exc).__name__}: {exc}"})

    def run_once(self) -> int:
        """One turn: queue the webhooks of batches that became final, then send the due
        deliveries (in parallel, up to SENDERS) and wait for them. Returns attempts made."""
        now = utcnow()
        queued = self.repo.queue_final_webhooks(
            now,
            QUEUE_PAGE,
            retry_for_s=self.settings.webhook_retry_for_s,
            body_of=final_body,
            new_id=new_delivery_id,
        )
        for delivery_id in queued:
            log.info("webhook queued", extra={"delivery_id": delivery_id})
        claim_s = self.settings.webhook_timeout_s + CLAIM_MARGIN_S
        due = self.repo.claim_due_webhooks(now, claim_s, SENDERS)
        for future in [self._pool.submit(self.attempt, delivery) for delivery in due]:
            future.result()
        return len(due)

    def attempt(self, delivery: WebhookDeliveryRecord) -> AttemptResult:
        """Send one attempt of a claimed delivery and record it."""
        started = time.monotonic()
        attempted_at = utcnow()
        result = self._send(delivery, started)
        next_at, gave_up = next_step(delivery, result, utcnow(), self.settings)
        self.repo.record_webhook_attempt(
            delivery.id,
            status_code=result.status_code,
            error=result.error,
            duration_ms=result.duration_ms,
            delivered=result.delivered,
            next_attempt_at=next_at,
            gave_up=gave_up,
            attempted_at=attempted_at,
        )
        fields = {
            "delivery_id": delivery.id,
            "batch_id": delivery.batch_id,
            "attempt": delivery.attempts + 1,
            "status_code": result.status_code,
            "error": result.error,
            "ms": round(result.duration_ms, 1),
        }
        if result.delivered:
            log.info("webhook delivered", extra=fields)
        elif gave_up:
            log.error("webhook failed: giving up", extra=fields)
        else:
            log.warning("webhook attempt failed", extra=fields | {"next_attempt_at": next_at})
        return result

    def _send(self, delivery: WebhookDeliveryRecord, started: float) -> AttemptResult:
        def failed(error: str, permanent: bool = False) -> AttemptResult:
            return AttemptResult(None, error, (time.monotonic() - started) * 1000, permanent)

        problem = webhook_url_problem(delivery.url, self.settings.webhook_allow_private)
        if problem is not None:
            return failed(f"refused: webhook_url {problem}")
        secret = self.repo.webhook_secret(delivery.owner) if delivery.owner is not None else None
        if secret is None:
            return failed("no signing secret: the batch was not made with an API key", permanent=True)
        body = delivery.body.encode()
        headers = signed_headers(secret, delivery.id, body, int(time.time()))
        try:
            response = self._client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:  # connection refused, timeout, protocol error
            return failed(f"{type(exc).__name__}: {exc}")
        elapsed = (time.monotonic() - started) * 1000
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        if response.is_redirect:
            error = f"HTTP {response.status_code}: redirects are not followed"
        return AttemptResult(response.status_code, error, elapsed)
