"""Signed webhooks: which URLs may be called, and how a body is signed.

Signing follows Standard Webhooks (standardwebhooks.com): headers `webhook-id`,
`webhook-timestamp` (Unix seconds) and `webhook-signature` = `v1,` + base64 HMAC-SHA256 over
`id.timestamp.body`, keyed with the base64-decoded part of the `whsec_…` secret.

A webhook URL must be http(s) and must not resolve to the farm's own network (loopback,
private, link-local, reserved addresses) unless LCMQ_WEBHOOK_ALLOW_PRIVATE=true: the check runs
at submit and again before every attempt (a name may resolve elsewhere later), and it never
opens a connection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from lcmq.access import WEBHOOK_SECRET_PREFIX
from lcmq.errors import InputError
from lcmq.models import JobState
from lcmq.repository import FINAL_EVENT, BatchRecord
from lcmq.settings import Settings

MAX_WEBHOOK_URL_CHARS = 2000
DELIVERY_ID_PREFIX = "msg_"
Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (no connection is made)."""
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def is_internal_address(address: str) -> bool:
    """Loopback, private, link-local, reserved, multicast or unspecified (IPv4-mapped IPv6 as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any((ip.is_loopback, ip.is_private, ip.is_link_local, ip.is_reserved, ip.is_multicast, ip.is_unspecified))


def webhook_url_problem(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> str | None:
    """Why `url` may not be called, or None. Resolves the host; never connects."""
    if not isinstance(url, str) or not url or len(url) > MAX_WEBHOOK_URL_CHARS:
        return f"must be an http(s) URL of at most {MAX_WEBHOOK_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host (got {url!r})"
    if parts.username or parts.password:
        return "must not carry a user name or password"
    if allow_private:
        return None
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError) as exc:
        return f"host {parts.hostname!r} does not resolve ({exc})"
    internal = [address for address in addresses if is_internal_address(address)]
    if internal or not addresses:
        return (
            f"host {parts.hostname!r} resolves to an internal address ({', '.join(internal) or 'none'}); "
            "set LCMQ_WEBHOOK_ALLOW_PRIVATE=true to allow it"
        )
    return None


def check_webhook_url(url: str, source: str, settings: Settings, resolve: Resolver = resolve_host) -> None:
    problem = webhook_url_problem(url, settings.webhook_allow_private, resolve)
    if problem is not None:
        raise InputError(source, None, "webhook_url", problem)


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does (used by the tests; shown in docs): any v1 signature that matches."""
    expected = signature(secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    return any(hmac.compare_digest(expected, candidate) for candidate in headers["webhook-signature"].split())


def new_delivery_id() -> str:
    """A delivery's id, the `webhook-id` header: the same on every attempt of one delivery."""
    return DELIVERY_ID_PREFIX + secrets.token_urlsafe(18)


def final_body(batch: BatchRecord, counts: dict[str, int]) -> str:
    """The body of a batch's `batch.final` webhook: `{"event": "batch.final"}` followed by what
    `lcmq batches --json` lists of the batch (the status object of `lcmq status --json` plus
    name, profile and created_at). Written once, when the delivery is queued, and sent as is.

    It is built here, not by lcmq.api (the sender runs in `lcmq scheduler` too, below the face);
    tests/integration/test_webhooks.py holds it equal to lcmq.api.batch_summary.
    """
    # The fields of lcmq.api.BatchStatus.to_dict, in its order (JobState's order is its).
    status: dict[str, object] = {
        "batch_id": batch.id,
        "total": batch.total,
        **{state.value: counts.get(state.value, 0) for state in JobState},
        "output": batch.output,
    }
    if batch.options.get("items") is not None:  # a schedule run's batch (as BatchStatus.to_dict)
        status["items"] = batch.options["items"]
    return json.dumps(
        {
            "event": FINAL_EVENT,
            **status,
            "name": batch.name,
            "profile": batch.profile,
            "created_at": batch.created_at.isoformat(),
        }
    )
