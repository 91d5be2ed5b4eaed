"""Who is calling: `Authorization: Bearer <key>` or the dashboard's session cookie (which holds
the key, HttpOnly). The key is looked up on every request, so a revocation made by any API
process holds from the next request. Keys never reach a log line: only the key's name does."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

from lcmq.access import Principal, authenticate

SESSION_COOKIE = "lcmq_session"

# Documents the Bearer scheme in /openapi.json for the routers that need a key; the key itself
# is checked by `Caller`.
bearer = HTTPBearer(auto_error=False, description="an API key: `lcmq apikey create NAME`")


def key_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(SESSION_COOKIE)


def current_principal(request: Request) -> Principal:
    """The caller's principal; 401 without a valid key (unknown and revoked read the same)."""
    key = key_of(request)
    principal = None if key is None else authenticate(request.app.state.repo, key)
    if principal is None:
        raise HTTPException(
            status_code=401,
            detail="a valid API key is needed: Authorization: Bearer <key> (lcmq apikey create NAME)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.principal = principal  # the access log names the key, never the key itself
    return principal


Caller = Annotated[Principal, Depends(current_principal)]
