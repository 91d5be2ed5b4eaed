"""Worker tokens: the one credential of an edge worker (a machine the farm does not trust).

An edge worker holds no database URL, broker URL or bucket credentials: it speaks only to the
gateway (lcmq/http/gateway.py) with one token. A token claims jobs of its profiles only, acts
only on the jobs it holds (jobs.worker = `edge/<token name>/<node>`), and reads nothing else.

Tokens are `lcmqw_` + 43 random URL-safe characters (an API key is `lcmq_…`: neither opens the
other's routes); only their sha256 is stored, and the token is shown once, at creation.
Revoking a token fences it at once: its next request is refused and its running jobs go back to
the queue in the same transaction. After `max_failures_in_a_row` failed jobs with no success
between them a token is paused (its workers claim nothing) until `lcmq workertoken resume`.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass

from lcmq.errors import InputError, NotFoundError
from lcmq.models import WORKER_TOKEN_NAME_LENGTH
from lcmq.profiles import load_profiles
from lcmq.repository import Repository, WorkerTokenRecord

TOKEN_PREFIX = "lcmqw_"
EDGE_PREFIX = "edge/"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# An edge worker's own name for itself (`hello`'s node): the last part of its worker string.
NODE_PATTERN = r"^[A-Za-z0-9._@-]{1,100}$"


@dataclass(frozen=True)
class NewWorkerToken:
    name: str
    token: str  # shown once
    profiles: list[str]
    cost_per_hour: float | None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def worker_prefix(name: str) -> str:
    """What every jobs.worker of this token's edge workers starts with."""
    return f"{EDGE_PREFIX}{name}/"


def edge_worker(name: str, node: str) -> str:
    """The jobs.worker (and workers.node) of one edge worker of token `name`."""
    return worker_prefix(name) + node


def check_name(name: str) -> None:
    if not (1 <= len(name) <= WORKER_TOKEN_NAME_LENGTH and NAME_PATTERN.fullmatch(name)):
        raise InputError(
            "workertoken",
            None,
            "NAME",
            f"must be 1-{WORKER_TOKEN_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(got {name!r})",
        )


def parse_profiles(text: str) -> list[str]:
    """`sd15,sdxl` as a sorted list of known profiles; an unknown one is named."""
    names = sorted({part.strip() for part in text.split(",") if part.strip()})
    if not names:
        raise InputError("workertoken", None, "--profiles", "names no profile (e.g. --profiles sd15,sdxl)")
    known = load_profiles()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(
            "workertoken",
            None,
            "--profiles",
            f"unknown profile {', '.join(map(repr, unknown))} (see `lcmq models`)",
        )
    return names


def check_cost(cost_per_hour: float | None) -> None:
    if cost_per_hour is not None and not (math.isfinite(cost_per_hour) and cost_per_hour >= 0):
        raise InputError("workertoken", None, "--cost-per-hour", f"must be a number >= 0 (got {cost_per_hour!r})")


def create_token(
    repo: Repository, name: str, profiles: list[str], cost_per_hour: float | None = None
) -> NewWorkerToken:
    check_name(name)
    check_cost(cost_per_hour)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    if not repo.add_worker_token(name, token_sha256(token), profiles, cost_per_hour):
        raise InputError("workertoken", None, "NAME", f"a worker token named {name!r} exists (names are not reused)")
    return NewWorkerToken(name=name, token=token, profiles=profiles, cost_per_hour=cost_per_hour)


def authenticate(repo: Repository, token: str) -> WorkerTokenRecord | None:
    """The record of a valid (not revoked) token; None otherwise, an API key included.
    Looked up on every request: a revocation by any process holds from the next request."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    return repo.worker_token_by_hash(token_sha256(token))


def list_tokens(repo: Repository) -> list[WorkerTokenRecord]:
    return repo.worker_tokens()


def revoke_token(repo: Repository, name: str) -> int:
    """Revoke, and release its running jobs in the same transaction; returns how many."""
    released = repo.revoke_worker_token(name, worker_prefix(name))
    if released is None:
        raise NotFoundError(f"no valid worker token {name!r}")
    return released


def resume_token(repo: Repository, name: str) -> None:
    if not repo.resume_worker_token(name):
        raise NotFoundError(f"no valid worker token {name!r}")


def token_record(repo: Repository, name: str) -> WorkerTokenRecord:
    for record in repo.worker_tokens():
        if record.name == name:
            return record
    raise NotFoundError(f"no worker token {name!r}")
