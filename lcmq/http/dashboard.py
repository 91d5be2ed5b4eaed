"""The dashboard at `/`: server-rendered pages over lcmq.api (Jinja2, autoescaped), a little
vanilla JS (static/batch.js), no front-end build.

Sign-in: `/?token=KEY` (the link `lcmq api` prints) or the `/signin` form put the key in the
session cookie (HttpOnly, SameSite=Lax, Secure on https) and redirect to the clean URL. Every
request looks the key up again (lcmq.http.auth), so a revoked key is out at its next request.
No key, no data: every page shows the sign-in form instead.

CSRF: the buttons that change state (cancel, retry) are POST forms, and a POST is accepted only
(1) with the cookie, which is SameSite=Lax, so a cross-site POST does not carry it, and (2) with
an Origin header, or failing that a Referer, naming this very host (else 403). No per-session
token: both defences hold without one, and the pages stay plain cacheable HTML.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from starlette.templating import Jinja2Templates

from lcmq import api
from lcmq.access import Principal, authenticate
from lcmq.errors import NotFoundError
from lcmq.http.auth import SESSION_COOKIE, key_of
from lcmq.repository import utcnow

HERE = Path(__file__).parent
GALLERY_PAGE = 200  # images per batch page: a 10^6-job batch is paged, never loaded
BATCHES_PAGE = 50
FAILURES_SHOWN = 100
# The pages run no inline script or style; images may come from the S3 endpoint (presigned).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: http: https:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",  # a sign-in link's token never reaches another host
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True))


def install(app: FastAPI) -> None:
    """The pages, their live-update routes and /static, on the app."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


# --- filters ----------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """`2h 03m`, `4m 05s`, `12s`; an em dash when unknown."""
    if seconds is None:
        return "—"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


templates.env.filters["duration"] = duration


# --- sign-in ----------------------------------------------------------------------------


def signed_in(request: Request) -> Principal | None:
    key = key_of(request)
    return None if key is None else authenticate(request.app.state.repo, key)


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def signin_page(request: Request, error: str | None = None) -> HTMLResponse:
    return page(request, "signin.html", {"error": error, "principal": None}, status=401)


def signed_in_redirect(request: Request, key: str, to: str) -> Response:
    response = RedirectResponse(to, status_code=303)
    response.set_cookie(
        SESSION_COOKIE, key, httponly=True, samesite="lax", secure=request.url.scheme == "https", path="/"
    )
    return response


def without_token(request: Request) -> str:
    """The URL asked for, relative, less its `token` parameter."""
    clean = request.url.remove_query_params("token")
    return clean.path + (f"?{clean.query}" if clean.query else "")


def check_same_origin(request: Request) -> None:
    """403 unless the POST comes from a page of this host (see the module's CSRF note)."""
    here = f"{request.url.scheme}://{request.url.netloc}"
    origin = request.headers.get("origin")
    referer = request.headers.get("referer", "")
    if origin is not None:
        same = origin == here
    else:
        same = referer == here or referer.startswith(here + "/")
    if not same:
        raise HTTPException(status_code=403, detail="cross-site request refused (Origin/Referer is not this host)")


def caller(request: Request) -> Principal:
    """For the routes a page's script or image tag calls: 401 without a valid session."""
    principal = signed_in(request)
    if principal is None:
        raise HTTPException(status_code=401, detail="sign in first: /signin")
    return principal


@router.get("/signin", response_class=HTMLResponse)
def signin_form(request: Request) -> Response:
    return page(request, "signin.html", {"error": None, "principal": None})


@router.post("/signin", response_class=HTMLResponse)
def signin(request: Request, key: str = Form("")) -> Response:
    check_same_origin(request)
    key = key.strip()
    if not key or authenticate(request.app.state.repo, key) is None:
        return signin_page(request, "That key is not valid (unknown, revoked or expired).")
    return signed_in_redirect(request, key, "/")


@router.api_route("/signout", methods=["GET", "POST"])
def signout() -> Response:
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- batches ------------------------------------------------------------------------------


def parse_cursor(before: str | None) -> tuple[datetime, str] | None:
    """`<batch_id>@<created_at ISO>`, the last batch of the previous page; None when malformed."""
    if not before or "@" not in before:
        return None
    batch_id, _, created_at = before.partition("@")
    try:
        return datetime.fromisoformat(created_at), batch_id
    except ValueError:
        return None


def listed_row(entry: dict[str, Any], rate: float, now: datetime) -> dict[str, Any]:
    finished = entry["succeeded"] + entry["failed"] + entry["canceled"]
    remaining = entry["queued"] + entry["running"]
    return entry | {
        "finished": finished,
        "percent": 100 if entry["total"] == 0 else int(100 * finished / entry["total"]),
        "rate": rate,
        "eta_s": remaining / rate if rate > 0 and remaining else (0.0 if not remaining else None),
        "age_s": (now - datetime.fromisoformat(entry["created_at"])).total_seconds(),
    }


@router.get("/", response_class=HTMLResponse)
def batches_page(request: Request, token: str | None = None, before: str | None = None) -> Response:
    if token is not None:
        if authenticate(request.app.state.repo, token) is None:
            return signin_page(request, "The sign-in link's key is not valid (unknown, revoked or expired).")
        return signed_in_redirect(request, token, without_token(request))
    principal = signed_in(request)
    if principal is None:
        return signin_page(request)
    listed = api.batches(BATCHES_PAGE, principal, parse_cursor(before))
    rates = api.images_per_second(listed, principal=principal)
    now = utcnow()
    rows = [listed_row(entry, rates.get(entry["batch_id"], 0.0), now) for entry in listed]
    older = f"{listed[-1]['batch_id']}@{listed[-1]['created_at']}" if len(listed) == BATCHES_PAGE else None
    return page(request, "batches.html", {"principal": principal, "rows": rows, "older": older})


def image_src(image: dict[str, Any]) -> str:
    """A presigned URL on S3; on file://, this app's /files route."""
    return image["src"] or f"/files/{image['key']}"


def details(image: dict[str, Any]) -> dict[str, Any]:
    """What a click on a thumbnail shows (read by static/batch.js)."""
    keys = ("index", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")
    shown = {key: image[key] for key in keys}
    for key in ("loras", "strength", "metadata", "worker", "render_ms"):
        if image[key]:
            shown[key] = image[key]
    return shown


def batch_parts(batch_id: str, after: int, principal: Principal) -> dict[str, Any]:
    """The gallery page's images and the failed jobs: the page's parts that live updates refetch."""
    images = [
        image | {"url": image_src(image), "details": json.dumps(details(image))}
        for image in api.gallery(batch_id, after_index=after, limit=GALLERY_PAGE, principal=principal)
    ]
    failures = api.jobs_page(batch_id, "failed", limit=FAILURES_SHOWN, principal=principal)
    more = images[-1]["index"] if len(images) == GALLERY_PAGE else None
    return {"images": images, "failures": failures, "more": more, "after": after}


def not_found(request: Request, principal: Principal, what: str) -> HTMLResponse:
    return page(request, "message.html", {"principal": principal, "message": f"No {what} here."}, status=404)


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch_page(request: Request, batch_id: str, after: int = -1) -> Response:
    principal = signed_in(request)
    if principal is None:
        return signin_page(request)
    try:
        batch = api.visible_batch(api.repository(), batch_id, principal)
        status = api.status(batch_id, principal).to_dict()
        parts = batch_parts(batch_id, after, principal)
        report = api.report(batch_id, principal)
    except NotFoundError:
        return not_found(request, principal, "such batch")
    finished = status["succeeded"] + status["failed"] + status["canceled"]
    return page(
        request,
        "batch.html",
        {
            "principal": principal,
            "batch": batch,
            "status": status,
            "finished": finished,
            "percent": 100 if status["total"] == 0 else int(100 * finished / status["total"]),
            "done": status["queued"] == 0 and status["running"] == 0,
            "report": report,
            **parts,
        },
    )


@router.get("/ui/batches/{batch_id}/parts", response_class=HTMLResponse)
def batch_parts_fragment(request: Request, batch_id: str, after: int = -1) -> Response:
    """The gallery and the failures as HTML (escaped here, once), for the page's live updates."""
    principal = caller(request)
    return page(request, "parts.html", batch_parts(batch_id, after, principal))


@router.post("/batches/{batch_id}/cancel")
def cancel(request: Request, batch_id: str) -> Response:
    check_same_origin(request)
    api.cancel(batch_id, caller(request))
    return RedirectResponse(f"/batches/{batch_id}", status_code=303)


@router.post("/batches/{batch_id}/retry")
def retry(request: Request, batch_id: str) -> Response:
    check_same_origin(request)
    api.retry_failed(batch_id, caller(request))
    return RedirectResponse(f"/batches/{batch_id}", status_code=303)


@router.get("/files/{key:path}")
def stored_file(request: Request, key: str) -> Response:
    """An image on file:// storage, only of a batch the caller sees (lcmq.api.stored_file)."""
    path = api.stored_file(key, caller(request))
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


# --- workers ------------------------------------------------------------------------------


@router.get("/workers", response_class=HTMLResponse)
def workers_page(request: Request) -> Response:
    principal = signed_in(request)
    if principal is None:
        return signin_page(request)
    list_workers = getattr(api, "workers", None)  # the farm's worker rows, where this build has them
    workers = None if list_workers is None else list_workers()
    return page(request, "workers.html", {"principal": principal, "workers": workers})
