"""GET /v1/batches/{batch_id}/webhooks: a batch's webhook deliveries and their attempts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from lcmq import api
from lcmq.http.auth import Caller, bearer
from lcmq.http.schemas import INVALID, NOT_FOUND, UNAUTHORIZED

router = APIRouter(
    prefix="/v1", tags=["webhooks"], dependencies=[Depends(bearer)], responses=UNAUTHORIZED | INVALID | NOT_FOUND
)


@router.get("/batches/{batch_id}/webhooks")
def batch_webhooks(batch_id: str, caller: Caller) -> dict[str, Any]:
    """Each delivery of the batch's webhook (state pending, delivered or failed; its body as
    sent) with every attempt: its time, HTTP status or error, and duration. Another key's batch
    is 404, as an unknown one."""
    return {"batch_id": batch_id, "deliveries": api.webhook_deliveries(batch_id, principal=caller)}
