"""`GatewaySource`: the `ObjectSource` (worker/model_fetch.py) of an edge worker. It holds no
bucket credentials: it asks the gateway (`POST /gateway/v1/models`) for each s3:// model of its
profile, gets the manifest and a presigned GET per file, and streams each file into the fetcher's
temporary folder. The fetcher checks every file against the manifest's size and sha256, so the
bytes are trusted no more than a Celery worker trusts its own S3 reads; the cache entry is keyed
by the manifest's bytes, the same as a Celery worker's on the same host.

The token is in the client's header only; presigned URLs are never logged (their signature is
a credential for their lifetime): errors show them without their query.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx

from lcmq.errors import MissingObjectError, PermanentStorageError, StorageError
from lcmq.modelpack import ModelFetchError, locate, profile_model_urls
from lcmq.profiles import Profile
from worker.gateway_client import REQUEST_TIMEOUT_S, GatewayClient, GatewayRefused, shown_url

log = logging.getLogger("lcmq.worker")

MODELS_PATIENCE_S = 120.0  # a gateway that is away at start-up: retried this long, then the load fails
CHUNK_BYTES = 1 << 20


class ExpiredUrl(Exception):
    """A presigned GET answered 403: its time ran out (a long download); ask for fresh ones."""


class GatewaySource:
    """Reads the profile's pushed models through the gateway and presigned GETs."""

    def __init__(self, client: GatewayClient, profile: Profile, timeout_s: float = REQUEST_TIMEOUT_S):
        self.client, self.profile = client, profile.name
        # The fetcher asks by manifest URL and object URL; the gateway answers by the profile's URL.
        self._model_of_manifest = {locate(url).manifest_url: url for url in profile_model_urls(profile)}
        self._files: dict[str, tuple[str, str]] = {}  # object URL -> (model URL, presigned GET)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))

    def close(self) -> None:
        self._http.close()

    def _ask(self, url: str) -> dict[str, Any]:
        """The gateway's answer for one model: its manifest text and a presigned GET per file."""
        try:
            answer = self.client.call_patiently(
                "/models", {"profile": self.profile, "urls": [url]}, patience_s=MODELS_PATIENCE_S
            )
        except GatewayRefused as exc:
            if exc.status == 404:
                raise MissingObjectError(str(exc)) from None
            raise ModelFetchError(f"{url}: {exc}") from None
        model = answer["models"][url]
        location = locate(url)
        for relative, presigned in model["urls"].items():
            self._files[location.object_url(relative)] = (url, presigned)
        return model

    def read(self, url: str) -> bytes:
        """A model's manifest, by its manifest URL (the fetcher reads nothing else)."""
        model_url = self._model_of_manifest.get(url)
        if model_url is None:
            raise PermanentStorageError(f"{url} is not the manifest of a model of profile {self.profile!r}")
        return str(self._ask(model_url)["manifest"]).encode("utf-8")

    def download(self, url: str, target: Path) -> None:
        """A file of a model whose manifest was read, streamed from its presigned GET; once more
        with fresh URLs when that one ran out."""
        if url not in self._files:
            raise MissingObjectError(f"{url}: the gateway gave no URL for it")
        try:
            self._stream(self._files[url][1], target)
        except ExpiredUrl:
            self._ask(self._files[url][0])
            try:
                self._stream(self._files[url][1], target)
            except ExpiredUrl:
                raise PermanentStorageError(f"{url}: its presigned GET was refused (403) twice") from None

    def _stream(self, presigned: str, target: Path) -> None:
        shown = shown_url(presigned)
        try:
            with self._http.stream("GET", presigned) as response:
                if response.status_code == 403:
                    raise ExpiredUrl(shown)
                if response.status_code == 404:
                    raise MissingObjectError(f"{shown}: no such object")
                if response.status_code >= 500:
                    raise StorageError(f"{shown} cannot be read: {response.status_code}")
                if response.status_code >= 300:
                    raise PermanentStorageError(f"{shown} cannot be read: {response.status_code}")
                with target.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
        except httpx.HTTPError as exc:  # no answer, or cut off mid-file (the size check would catch it too)
            raise StorageError(f"{shown} cannot be read: {type(exc).__name__}") from exc
