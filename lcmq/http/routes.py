"""The /v1 JSON API, /healthz and /readyz."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is up (nothing else is checked: see /readyz)."""
    return {"status": "ok"}
