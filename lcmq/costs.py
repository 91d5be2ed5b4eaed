"""Images per dollar: what a batch cost on the workers that rendered it (`lcmq report`).

The figures, per worker (the name its jobs carry in `jobs.worker`) and for the batch, from the
batch's succeeded jobs only (the images):

- busy span of a worker = its last image's `finished_at` − its first image's `started_at` on this
  batch (from the claim of its first micro-batch to the record of its last image);
- wall time of the batch = the last `finished_at` − the first `started_at` over all its images;
- GPU-busy seconds = Σ render_ms / 1000. A job's render_ms is its share of the pipeline call that
  rendered its micro-batch (the call's time ÷ the images in it), so the sum is the time spent
  in pipeline calls, without claiming, encoding or uploading;
- images/s = images ÷ busy span (per worker) or ÷ wall time (batch);
- cost of a worker = cost_per_hour × busy span / 3600: it is billed for its span on the batch,
  idle gaps within the span included (a rented machine is paid by the hour, busy or not);
- cost per 1,000 images = cost ÷ images × 1000; images per dollar = images ÷ cost (in whatever
  currency cost_per_hour was given in);
- the batch's cost is the sum of its priced workers' costs, and its cost per 1,000 images and
  images per dollar are over those workers' images only (`unpriced_workers` lists the others).

A worker that interleaved this batch with another is billed its whole span here and there too:
the sum over batches is then above what the machine cost. A job retried on a second worker
counts for the worker that rendered it (its first try's time is nobody's).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lcmq.repository import WorkerJobSums, WorkerRecord

SECONDS_PER_HOUR = 3600.0


def _ratio(numerator: float, denominator: float | None) -> float | None:
    return numerator / denominator if denominator else None


@dataclass(frozen=True)
class WorkerCost:
    """One worker's figures on one batch."""

    worker: str  # jobs.worker: a Celery node name, or `edge/<token>/<node>`
    images: int
    failed: int
    gpu_busy_s: float
    first_started_at: datetime
    last_finished_at: datetime
    cost_per_hour: float | None  # None: its row names no cost (or it has no row)

    @property
    def busy_s(self) -> float:
        return (self.last_finished_at - self.first_started_at).total_seconds()

    @property
    def cost(self) -> float | None:
        return None if self.cost_per_hour is None else self.cost_per_hour * self.busy_s / SECONDS_PER_HOUR

    def to_dict(self) -> dict[str, Any]:
        cost = self.cost
        return {
            "worker": self.worker,
            "images": self.images,
            "failed": self.failed,
            "busy_s": self.busy_s,
            "gpu_busy_s": self.gpu_busy_s,
            "images_per_s": _ratio(self.images, self.busy_s),
            "cost_per_hour": self.cost_per_hour,
            "cost": cost,
            "cost_per_1000_images": None if cost is None else _ratio(cost * 1000, self.images),
            "images_per_dollar": None if cost is None else _ratio(self.images, cost),
            "first_started_at": self.first_started_at.isoformat(),
            "last_finished_at": self.last_finished_at.isoformat(),
        }


def job_worker_of(row: WorkerRecord) -> str:
    """The name a worker row's jobs carry in `jobs.worker`. A prefork pool child's row is named
    `<node>#<its pid>` (worker/presence.py: the children of one node share the Celery node name,
    which is what the task records); a solo/threads worker's and an edge worker's row is the
    name itself. Only a `#` followed by the row's own pid is removed, so a name that holds a `#`
    of its own is kept whole."""
    return row.node.removesuffix(f"#{row.pid}")


def cost_per_hour_of(name: str, rows: list[WorkerRecord], last_finished_at: datetime) -> float | None:
    """The cost per hour of the worker whose jobs carry `name`. Its rows are the pool children of
    one `lcmq worker` (one --cost-per-hour for all) or processes that reused the name; the one
    that was running when the worker recorded its last image of the batch wins (the latest
    started by then), else the first one started."""
    priced = sorted(
        (row for row in rows if job_worker_of(row) == name and row.cost_per_hour is not None),
        key=lambda row: row.started_at,
    )
    if not priced:
        return None
    started_by_then = [row for row in priced if row.started_at <= last_finished_at]
    return (started_by_then[-1] if started_by_then else priced[0]).cost_per_hour


def worker_costs(sums: list[WorkerJobSums], rows: list[WorkerRecord]) -> list[WorkerCost]:
    return [
        WorkerCost(
            worker=s.worker,
            images=s.images,
            failed=s.failed,
            gpu_busy_s=s.render_ms / 1000,
            first_started_at=s.first_started_at,
            last_finished_at=s.last_finished_at,
            cost_per_hour=cost_per_hour_of(s.worker, rows, s.last_finished_at),
        )
        for s in sums
        if s.first_started_at is not None and s.last_finished_at is not None  # it rendered an image
    ]


def batch_costs(workers: list[WorkerCost]) -> dict[str, Any]:
    """The batch's figures over its workers (see the module's docstring)."""
    images = sum(w.images for w in workers)
    wall_s = None
    if workers:
        first = min(w.first_started_at for w in workers)
        wall_s = (max(w.last_finished_at for w in workers) - first).total_seconds()
    priced = [w for w in workers if w.cost is not None]
    cost = sum(w.cost for w in priced if w.cost is not None) if priced else None
    priced_images = sum(w.images for w in priced)
    return {
        "images": images,
        "wall_s": wall_s,
        "gpu_busy_s": sum(w.gpu_busy_s for w in workers),
        "images_per_s": None if wall_s is None else _ratio(images, wall_s),
        "cost": cost,
        "priced_images": priced_images,
        "cost_per_1000_images": None if cost is None else _ratio(cost * 1000, priced_images),
        "images_per_dollar": None if cost is None else _ratio(priced_images, cost),
        "unpriced_workers": [w.worker for w in workers if w.cost is None],
    }
