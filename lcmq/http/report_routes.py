"""GET /v1/batches/{batch_id}/report: images per second and per dollar (lcmq.costs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from lcmq import api
from lcmq.http.auth import Caller, bearer
from lcmq.http.schemas import INVALID, NOT_FOUND, UNAUTHORIZED

router = APIRouter(
    prefix="/v1", tags=["batches"], dependencies=[Depends(bearer)], responses=UNAUTHORIZED | INVALID | NOT_FOUND
)


class WorkerReport(BaseModel):
    worker: str = Field(description="the name in jobs.worker: a Celery node name, or edge/<token>/<node>")
    images: int
    failed: int
    busy_s: float = Field(description="its first image's claim to its last image's record, on this batch")
    gpu_busy_s: float = Field(description="Σ render_ms ÷ 1000 of its images: time in pipeline calls")
    images_per_s: float | None
    cost_per_hour: float | None = Field(description="from its row in `lcmq workers`; null: none given")
    cost: float | None = Field(description="cost_per_hour × busy_s ÷ 3600")
    cost_per_1000_images: float | None
    images_per_dollar: float | None
    first_started_at: str
    last_finished_at: str


class BatchReport(BaseModel):
    """The object of `lcmq report --json` (formulas: docs/cli.md#lcmq-report-batch---json)."""

    batch_id: str
    profile: str
    total: int
    failed: int
    done: bool = Field(description="false: still rendering, the figures cover the images so far")
    images: int
    wall_s: float | None
    gpu_busy_s: float
    images_per_s: float | None
    cost: float | None = Field(description="Σ over the workers with a cost")
    priced_images: int = Field(description="images of the workers with a cost: what the cost figures cover")
    cost_per_1000_images: float | None
    images_per_dollar: float | None
    unpriced_workers: list[str]
    workers: list[WorkerReport]


@router.get("/batches/{batch_id}/report", response_model=BatchReport)
def batch_report(batch_id: str, caller: Caller) -> dict[str, Any]:
    """What the batch's images took and cost, per worker and in total. Another key's batch is
    404, as an unknown one."""
    return api.report(batch_id, principal=caller)
