"""`lcmq api`: the app on uvicorn, and the sign-in link it prints.

At start it makes a sign-in key (an admin key named `signin-<8 hex>`, expiring after
SIGNIN_KEY_TTL) and prints `http://host:port/?token=<key>`, the way Jupyter does: a person opens
it and the dashboard sets its session cookie. The key is revoked when the process stops cleanly
and expires on its own otherwise, so a hard-killed process leaves no lasting admin key.
"""

from __future__ import annotations

import logging
import secrets
import sys
from datetime import timedelta

from lcmq import access
from lcmq.logs import setup_logging
from lcmq.repository import Repository, utcnow
from lcmq.settings import Settings

log = logging.getLogger("lcmq.http")

SIGNIN_KEY_TTL = timedelta(hours=12)


def signin_key(repo: Repository) -> access.NewKey:
    name = f"signin-{secrets.token_hex(4)}"
    return access.create_key(repo, name, admin=True, expires_at=utcnow() + SIGNIN_KEY_TTL)


def serve(settings: Settings, host: str, port: int, *, signin_link: bool = True) -> int:
    import uvicorn

    from lcmq.http.app import create_app

    setup_logging(settings.log_level, settings.log_json)  # the access log (lcmq.http.middleware)
    app = create_app(settings)
    key = signin_key(app.state.repo) if signin_link else None
    shown_host = f"[{host}]" if ":" in host else host
    print(f"lcmq api ready on http://{shown_host}:{port}", file=sys.stderr, flush=True)
    if key is not None:
        print(f"Sign in to the dashboard: http://{shown_host}:{port}/?token={key.key}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        if key is not None:
            app.state.repo.revoke_api_key(key.name)
    return 0
