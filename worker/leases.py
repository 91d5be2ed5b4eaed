"""The jobs this worker process owns, in one ledger, and the one heartbeat that renews them.

A job's lease goes claim -> hold -> settle -> drop:
- claim: the conditional update makes the job this worker's, and the ledger records it at once,
  held by the task that claimed it (so it is renewed from its first moment);
- hold: the task hands a rendered micro-batch to the store pipeline, which holds it from then
  on (the task may return long before the images are stored);
- settle: the holder records the job done, fails it, or hands it back to the queue;
- drop: the ledger forgets the job, whether the settle went through or not (with the database
  away, the lease runs out and the sweeper recovers the job).
One heartbeat thread renews every lease in the ledger every lease_s/3. It is started when the
process's ledger is made and stopped at worker shutdown, once the store pipeline is drained.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from celery.utils.time import get_exponential_backoff_interval

from lcmq.repository import HandBack, JobRecord, StoredImage
from worker.ports import JobStore

log = logging.getLogger("lcmq.worker")

HANDBACK_BACKOFF_FACTOR_S = 1
HANDBACK_BACKOFF_MAX_S = 120


def handback_delay_s(handbacks: int) -> int:
    """Seconds before a handed-back job's message is due: up to 2^handbacks (at most two
    minutes), with full jitter so that a farm does not retry a flaky bucket in lockstep."""
    return get_exponential_backoff_interval(
        HANDBACK_BACKOFF_FACTOR_S, handbacks, HANDBACK_BACKOFF_MAX_S, full_jitter=True
    )


@dataclass(frozen=True)
class Lease:
    jobs: JobStore  # the port the job was claimed through (it names the worker that holds it)
    holder: object  # who settles the job: the task that claimed it, or the store pipeline


class LeaseLedger:
    """Every job this process holds a lease on, and who holds it. Thread-safe (one lock)."""

    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- the heartbeat ------------------------------------------------------------------------

    def start(self) -> Self:
        with self._lock:
            if self._heartbeat is None:
                self._stopping.clear()
                self._heartbeat = threading.Thread(target=self._beat, name="lcmq-heartbeat", daemon=True)
                self._heartbeat.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the leases still held then run out: the sweeper recovers those jobs)."""
        with self._lock:
            heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            self._stopping.set()
            heartbeat.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def beating(self) -> bool:
        with self._lock:
            return self._heartbeat is not None and self._heartbeat.is_alive()

    def _beat(self) -> None:
        # A worker that dies stops renewing, so its jobs become claimable lease_s later.
        while not self._stopping.wait(self.lease_s / 3):
            self.renew()

    def renew(self) -> None:
        for jobs, ids in self._by_owner(self._leases_now()):
            try:
                still_held = jobs.renew(ids, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - a missed renewal must not stop the next ones
                log.warning("lease renewal failed", extra={"jobs": len(ids), "error": str(exc)})
                continue
            if still_held is not None and (lost := [job_id for job_id in ids if job_id not in still_held]):
                # Canceled, or taken by another worker after the lease ran out: not ours to
                # store or record any more.
                log.warning("leases lost, jobs dropped", extra={"jobs": len(lost), "worker": jobs.worker})
                self.drop(lost)

    # --- claim, hold ----------------------------------------------------------------------------

    def claim(
        self, jobs: JobStore, job_ids: Sequence[str], holder: object, max_attempts: int | None = None
    ) -> list[JobRecord]:
        """Take the free jobs among `job_ids` (the store's conditional claim), held by `holder`."""
        claimed = jobs.claim(job_ids, self.lease_s, max_attempts)
        self.hold(jobs, [job.id for job in claimed], holder)
        return claimed

    def hold(self, jobs: JobStore, job_ids: Sequence[str], holder: object) -> None:
        """`holder` settles these jobs (claimed through `jobs`: by ids above, or by an edge
        worker's claim by profile) from now on."""
        with self._lock:
            self._leases.update((job_id, Lease(jobs, holder)) for job_id in job_ids)

    def holds(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._leases

    def held_by(self, holder: object) -> list[str]:
        with self._lock:
            return [job_id for job_id, lease in self._leases.items() if lease.holder is holder]

    def count(self, holder: object | None = None) -> int:
        with self._lock:
            return sum(1 for lease in self._leases.values() if holder is None or lease.holder is holder)

    # --- settle, drop ---------------------------------------------------------------------------

    def record(self, stored: Sequence[StoredImage]) -> int:
        """Record the jobs done (those this worker still holds in the database), then drop them.
        If the record fails they stay held: the caller settles that failure (fail, hand back)."""
        ids = [image.job_id for image in stored]
        recorded = 0
        for jobs, group in self._by_owner(self._leases_of(ids)):
            mine = set(group)
            recorded += jobs.record([image for image in stored if image.job_id in mine])
        self.drop(ids)
        return recorded

    def fail(self, job_ids: Sequence[str], reason: str) -> int:
        try:
            return sum(jobs.fail(ids, reason) for jobs, ids in self._by_owner(self._leases_of(job_ids)))
        finally:
            self.drop(job_ids)

    def hand_back(self, job_ids: Sequence[str], reason: str, max_handbacks: int) -> HandBack:
        """Back to the queue after a transient fault, or failed once handed back too often; the
        caller publishes `requeued` after `handback_delay_s(handbacks)`."""
        requeued: list[str] = []
        failed: list[str] = []
        handbacks = 0
        try:
            for jobs, ids in self._by_owner(self._leases_of(job_ids)):
                handed = jobs.hand_back(ids, reason, max_handbacks)
                requeued += handed.requeued
                failed += handed.failed
                handbacks = max(handbacks, handed.handbacks)
        finally:
            self.drop(job_ids)
        return HandBack(requeued, failed, handbacks)

    def drop(self, job_ids: Sequence[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._leases.pop(job_id, None)

    # --- grouping -------------------------------------------------------------------------------

    def _leases_now(self) -> dict[str, Lease]:
        with self._lock:
            return dict(self._leases)

    def _leases_of(self, job_ids: Sequence[str]) -> dict[str, Lease]:
        with self._lock:
            return {job_id: self._leases[job_id] for job_id in job_ids if job_id in self._leases}

    @staticmethod
    def _by_owner(leases: dict[str, Lease]) -> list[tuple[JobStore, list[str]]]:
        """The job ids grouped by the job store (and so the worker name) that claimed them: one
        statement or request each."""
        groups: dict[JobStore, tuple[JobStore, list[str]]] = {}  # equal stores (same repository
        # and worker: one per task of a Celery worker) make one group
        for job_id, lease in leases.items():
            _, ids = groups.setdefault(lease.jobs, (lease.jobs, []))
            ids.append(job_id)
        return list(groups.values())


_LEDGERS: dict[int, LeaseLedger] = {}
_LEDGERS_LOCK = threading.Lock()


def process_leases(lease_s: float = 120.0) -> LeaseLedger:
    """This process's ledger, its heartbeat started (a forked pool child makes its own: threads
    do not survive fork). Stopped by `stop_process_leases` at worker shutdown."""
    pid = os.getpid()
    with _LEDGERS_LOCK:
        if pid not in _LEDGERS:
            _LEDGERS[pid] = LeaseLedger(lease_s)
        ledger = _LEDGERS[pid]
    return ledger.start()  # again after a stop: a process that goes on working renews again


def stop_process_leases() -> None:
    with _LEDGERS_LOCK:
        ledger = _LEDGERS.get(os.getpid())
    if ledger is not None:
        ledger.stop()
