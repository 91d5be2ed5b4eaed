"""The app factory and the one mapping of lcmq's error tree to HTTP statuses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lcmq.api import repository
from lcmq.errors import InputError, LcmqError, NotFoundError, TransientError
from lcmq.settings import Settings, get_settings

log = logging.getLogger("lcmq.http")


def error_body(exc: LcmqError) -> dict:
    """`{"error": <the CLI's message>}`, plus where for an input error (file, line, field)."""
    body: dict = {"error": str(exc)}
    if isinstance(exc, InputError):
        body |= {"source": exc.source, "line": exc.line, "field": exc.field, "message": exc.message}
    return body


def status_of(exc: LcmqError) -> int:
    """By class, never by message: input 422, unknown (or another key's) 404, a passing fault
    503 (retry), anything else refused 400."""
    if isinstance(exc, InputError):
        return 422
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, TransientError):
        return 503
    return 400


async def lcmq_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LcmqError)
    status = status_of(exc)
    if status >= 500:
        log.warning("request failed", extra={"path": request.url.path, "error": str(exc)})
    return JSONResponse(error_body(exc), status_code=status, headers={"Retry-After": "5"} if status == 503 else None)


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """A parameter FastAPI refused (a limit out of range, a state that is none): the same body
    as lcmq's input errors, naming the parameter."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    location = [str(part) for part in errors[0]["loc"]] if errors else []
    message = str(errors[0]["msg"]) if errors else "invalid request"
    where, field = (location[0], ".".join(location[1:])) if len(location) > 1 else ("request", ".".join(location))
    return JSONResponse(error_body(InputError(where, None, field or None, message)), status_code=422)


class BackgroundLoop(Protocol):
    def stop(self) -> None: ...


def start_background_loops(settings: Settings) -> list[BackgroundLoop]:
    """The loops an API process runs beside its requests (webhook delivery), started with the
    app and stopped with it."""
    from scheduler.webhooks import DeliveryLoop

    return [DeliveryLoop(settings).start()]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    loops = start_background_loops(app.state.settings) if app.state.run_background else []
    try:
        yield
    finally:
        for loop in loops:
            loop.stop()


def create_app(settings: Settings | None = None, *, run_background: bool = True) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="lcmq",
        version="1",
        description="A batch rendering queue for few-step (LCM-LoRA) diffusion: batches, jobs, schedules, workers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.run_background = run_background
    app.state.repo = repository(settings)
    app.add_exception_handler(LcmqError, lcmq_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    from lcmq.http import dashboard, farm, gateway, routes, webhook_routes
    from lcmq.http.middleware import AccessLog, BodyLimit

    app.add_middleware(BodyLimit, max_bytes=int(settings.api_max_body_mb * (1 << 20)))
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.gateway_max_body_kb << 10,
        path_prefix=f"{gateway.PREFIX}/",
        limit_text=f"{settings.gateway_max_body_kb} KiB (LCMQ_GATEWAY_MAX_BODY_KB)",
    )
    app.add_middleware(AccessLog)  # outermost: a refused body is logged too

    app.include_router(routes.router)
    app.include_router(webhook_routes.router)
    app.include_router(farm.router)  # /metrics
    app.include_router(farm.v1)  # /v1/workers
    gateway.install(app, settings, app.state.repo)  # /gateway/v1: edge workers, worker tokens only
    dashboard.install(app)
    return app
