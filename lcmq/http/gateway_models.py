"""`POST /gateway/v1/models`: the s3:// models of a profile, for an edge worker with no bucket
credentials (docs/edge.md, "Models").

The answer gives each model's manifest as `lcmq models push` wrote it (the gateway is trusted
for it) and a presigned GET per file it lists; the worker downloads the files and checks each
against the manifest's size and sha256 (worker/model_fetch.py), so the bytes from S3 are trusted
no more than for a Celery worker. A token gets GETs only for the models named by a profile it may
claim (base, config, vae, LCM-LoRA, the profile's style LoRAs): any other URL is 403, so a token
cannot read an arbitrary key of the bucket.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from lcmq.errors import MissingObjectError, ProfileError, StorageError
from lcmq.http.gateway import PREFIX, Gateway, GatewayDep, GatewayRefusal, Node, Token, own_profile
from lcmq.modelpack import MANIFEST_FILE, locate, parse_manifest, profile_model_urls
from lcmq.profiles import Profile, get_profile
from lcmq.repository import utcnow
from lcmq.storage import S3Storage, read_url

MAX_MODELS = 16  # URLs in one call: a profile names at most base, config, vae, LCM-LoRA and 8 styles

router = APIRouter(prefix=PREFIX, include_in_schema=False)


class ModelsIn(BaseModel):
    node: Node
    profile: str = Field(max_length=100)
    urls: list[Annotated[str, Field(max_length=1000)]] = Field(min_length=1, max_length=MAX_MODELS)


def served_profile(name: str) -> Profile:
    try:
        return get_profile(name)
    except ProfileError as exc:
        raise GatewayRefusal(404, f"profile {name!r} is not defined on the gateway: {exc}") from None


def allowed(profile: Profile, urls: list[str]) -> None:
    """403 for any URL the profile does not name as a model."""
    named = profile_model_urls(profile)
    for url in urls:
        if url not in named:
            raise GatewayRefusal(
                403,
                f"{url!r} is not a model of profile {profile.name!r}: a worker token may read only the "
                "s3:// models (base, config, vae, lcm_lora, style LoRAs) its profiles name",
            )


def model_files(gateway: Gateway, storage: S3Storage, url: str) -> dict[str, Any]:
    """The model's manifest (read with the gateway's credentials) and a presigned GET per file."""
    settings = gateway.settings
    location = locate(url)
    try:
        raw = read_url(
            location.manifest_url,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            timeout_s=settings.s3_timeout_s,
            max_attempts=settings.s3_max_attempts,
        )
    except MissingObjectError:
        raise GatewayRefusal(
            404, f"{url}: no {MANIFEST_FILE} at {location.manifest_url} (push the model with `lcmq models push`)"
        ) from None
    except StorageError as exc:
        raise GatewayRefusal(503, f"{url}: the manifest cannot be read now: {type(exc).__name__}") from None
    try:
        manifest = parse_manifest(raw, url)
    except ProfileError as exc:
        raise GatewayRefusal(422, str(exc)) from None
    ttl_s = settings.gateway_url_ttl_s
    urls = {f.path: storage.presigned_get(location.bucket, location.key(f.path), ttl_s) for f in manifest.files}
    return {"manifest": raw.decode("utf-8"), "urls": urls}


@router.post("/models")
def models(body: ModelsIn, token: Token, gateway: GatewayDep) -> dict[str, Any]:
    own_profile(token, body.profile)
    profile = served_profile(body.profile)
    allowed(profile, body.urls)
    storage = gateway.storage  # 503 on file:// storage: nothing can presign
    answer = {url: model_files(gateway, storage, url) for url in dict.fromkeys(body.urls)}
    expires_at = (utcnow() + timedelta(seconds=gateway.settings.gateway_url_ttl_s)).isoformat()
    return {"models": answer, "expires_at": expires_at}
