"""ASGI middleware of the API: the access log and the request body limit.

The access log names the method, the path (without its query string: a sign-in link's `token=`
never reaches a log), the status, the milliseconds and the API key's NAME; never a key.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("lcmq.http.access")


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            principal = scope.get("state", {}).get("principal")
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                    "key": getattr(principal, "name", None),
                },
            )


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over `max_bytes`: at once by its Content-Length, or, sent in chunks,
    when the bytes read pass the limit (the route stops reading; nothing was submitted)."""

    def __init__(self, app: ASGIApp, max_bytes: int, *, path_prefix: str = "", limit_text: str | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.path_prefix = path_prefix  # only requests under it (the gateway has its own limit)
        self.limit_text = limit_text or f"{max_bytes / (1 << 20):g} MiB (LCMQ_API_MAX_BODY_MB)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path_prefix):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(send)
            return
        seen, started = 0, False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, send_noting_start)
        except BodyTooLarge:
            if not started:
                await self.too_large(send)

    async def too_large(self, send: Send) -> None:
        body = f'{{"error":"the request body is larger than {self.limit_text}"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
