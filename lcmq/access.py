"""Who is asking, and what they may see: API keys and the owner rule.

A batch or schedule belongs to the API key that made it (`owner` = the key's name), or to no key
when made on the CLI or the Python API. A key sees its own; an admin key sees everything; the
local caller (the CLI, a script holding the database URL) is an admin. A key's own batch that it
may not see is "not found", never "forbidden": a key learns nothing of others' ids.

Keys are `lcmq_` + 43 random URL-safe characters; only their sha256 is stored. Each key also
has a webhook secret (`whsec_` + base64, the Standard Webhooks form) that signs the webhooks
of its batches; both are shown once, at creation.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from lcmq.errors import InputError, NotFoundError
from lcmq.models import API_KEY_NAME_LENGTH
from lcmq.repository import ApiKeyRecord, Repository

KEY_PREFIX = "lcmq_"
WEBHOOK_SECRET_PREFIX = "whsec_"
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Principal:
    """The caller: an API key's name (None: the local caller) and whether it is an admin."""

    name: str | None
    admin: bool

    def sees(self, owner: str | None) -> bool:
        return self.admin or (self.name is not None and owner == self.name)

    @property
    def local_files(self) -> bool:
        """Whether the caller may name files of the machine that runs lcmq (init images, LoRAs,
        catalogs): the local caller may; an API key names s3:// objects only."""
        return self.name is None

    @property
    def owner(self) -> str | None:
        """What a batch or schedule this caller makes records as its owner."""
        return self.name


LOCAL = Principal(name=None, admin=True)


@dataclass(frozen=True)
class NewKey:
    name: str
    key: str  # shown once
    webhook_secret: str  # shown once
    admin: bool


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_key_name(name: str) -> None:
    if not (1 <= len(name) <= API_KEY_NAME_LENGTH and KEY_NAME_PATTERN.fullmatch(name)):
        raise InputError(
            "apikey",
            None,
            "NAME",
            f"must be 1-{API_KEY_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(got {name!r})",
        )


def create_key(repo: Repository, name: str, *, admin: bool = False, expires_at: datetime | None = None) -> NewKey:
    check_key_name(name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    webhook_secret = WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()
    if not repo.add_api_key(name, key_sha256(key), webhook_secret, admin, expires_at):
        raise InputError("apikey", None, "NAME", f"a key named {name!r} exists (names are not reused)")
    return NewKey(name=name, key=key, webhook_secret=webhook_secret, admin=admin)


def authenticate(repo: Repository, key: str) -> Principal | None:
    """The principal of a valid key; None for an unknown or revoked one. Looked up on every
    request: a revocation by any process holds from the next request."""
    if not key.startswith(KEY_PREFIX):
        return None
    record = repo.api_key_by_hash(key_sha256(key))
    return None if record is None else Principal(name=record.name, admin=record.admin)


def list_keys(repo: Repository) -> list[ApiKeyRecord]:
    return repo.api_keys()


def revoke_key(repo: Repository, name: str) -> None:
    if not repo.revoke_api_key(name):
        raise NotFoundError(f"no valid API key {name!r}")
