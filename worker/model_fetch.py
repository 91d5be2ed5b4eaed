"""Models fetched on demand: an s3:// profile reference becomes a verified local copy, once per host.

A reference names a pushed model (lcmq/modelpack.py): a folder `s3://bucket/prefix/` or one file
`s3://bucket/prefix/model.safetensors`. The fetcher reads the prefix's manifest, and the cache
entry is keyed by the prefix's URL and the manifest's sha256, so a model pushed again under
the same name is a new entry, and the same push is one entry for every profile naming it:

    <models dir>/remote/<sha256(url)[:16]>-<sha256(manifest)[:16]>/      the files + the manifest
    <models dir>/remote/<same name>.lock                                  fcntl lock of the download
    <models dir>/remote/.tmp-<same name>-XXXX/                            a download in progress

An entry exists only complete: files are downloaded into a temporary folder, each checked
against the manifest's size and sha256, and the folder is renamed into place last. A file that
does not match fails the fetch with ModelFetchError naming it, and the temporary folder is
removed: nothing half-written is ever used. Processes on one host share a download through
an exclusive flock on the lock file: the first downloads, the others wait on the lock and then
find the entry there. The kernel drops a dead holder's lock, and the next holder clears its
leftover temporary folder.

Where the bytes come from is an `ObjectSource`: `S3Source` reads with this worker's
credentials. An edge worker (no credentials) passes a `GatewaySource`
(worker/gateway_models.py), which asks the gateway for the manifest and a presigned GET per file
(`load_pipeline(..., source=)` in worker/pipeline.py); the checks here are the same.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from lcmq.errors import MissingObjectError
from lcmq.modelpack import (
    MANIFEST_FILE,
    ManifestFile,
    ManifestMissingError,
    ModelFetchError,
    ModelLocation,
    ModelManifest,
    locate,
    manifest_digest,
    parse_manifest,
)
from lcmq.settings import Settings
from lcmq.storage import download_url, file_sha256, read_url

log = logging.getLogger("lcmq.worker")

REMOTE_DIR = "remote"  # under the models dir, beside the generated models
TEMP_PREFIX = ".tmp-"
Outcome = Literal["hit", "miss"]


class ObjectSource(Protocol):
    """Reads objects named by s3:// URLs. MissingObjectError when there is none; StorageError
    (transient) when the store is away."""

    def read(self, url: str) -> bytes:
        """A small object (the manifest), whole."""

    def download(self, url: str, target: Path) -> None:
        """An object into a local file, streamed (model weights are gigabytes)."""


class S3Source:
    """The direct adapter: this process's S3 endpoint and credentials (Celery workers)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def _options(self) -> dict:
        s = self.settings
        return {
            "endpoint_url": s.s3_endpoint_url,
            "region": s.s3_region,
            "timeout_s": s.s3_timeout_s,
            "max_attempts": s.s3_max_attempts,
        }

    def read(self, url: str) -> bytes:
        return read_url(url, **self._options())

    def download(self, url: str, target: Path) -> None:
        download_url(url, target, **self._options())


@dataclass(frozen=True)
class Fetched:
    url: str
    path: Path  # what to load: the entry folder, or the single file inside it
    outcome: Outcome  # "hit": the entry was there (maybe after waiting for another process)
    seconds: float  # manifest read + wait + download + checks
    waited_s: float = 0.0  # time spent waiting for another process's download


def cache_entry(models_dir: Path, location: ModelLocation, digest: str) -> Path:
    prefix_url = f"s3://{location.bucket}/{location.prefix}/"
    url_hash = hashlib.sha256(prefix_url.encode()).hexdigest()[:16]
    return models_dir / REMOTE_DIR / f"{url_hash}-{digest[:16]}"


def lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


def check_file(url: str, expected: ManifestFile, path: Path) -> None:
    """A downloaded file against its manifest entry: size first (cheap), then sha256."""
    size = path.stat().st_size
    if size != expected.size:
        raise ModelFetchError(
            f"{url}: {expected.path}: {size} bytes, the manifest says {expected.size}; the download was discarded"
        )
    actual = file_sha256(path)
    if actual != expected.sha256:
        raise ModelFetchError(
            f"{url}: {expected.path}: sha256 {actual[:12]}… does not match the manifest's "
            f"{expected.sha256[:12]}…; the download was discarded"
        )


def intact(entry: Path, manifest: ModelManifest) -> bool:
    """A complete entry still holds every file at its size (a cheap look; the sha256 was checked
    when it was downloaded, and the entry is never written after its rename)."""
    try:
        return all((entry / f.path).stat().st_size == f.size for f in manifest.files)
    except OSError:
        return False


@contextmanager
def host_lock(path: Path) -> Iterator[float]:
    """An exclusive flock on `path`, shared by every process of the host; yields seconds waited."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released by close, or by the kernel if the holder dies
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clear_leftovers(entry: Path) -> None:
    """Temporary folders of this entry left by a process killed mid-download (the lock is held:
    nobody else is writing one)."""
    for leftover in entry.parent.glob(f"{TEMP_PREFIX}{entry.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _download(url: str, location: ModelLocation, manifest: ModelManifest, raw: bytes, entry: Path, source) -> None:
    _clear_leftovers(entry)
    if entry.exists():  # present but not intact (a file deleted by hand): replaced whole
        shutil.rmtree(entry)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{TEMP_PREFIX}{entry.name}-"))
    try:
        for expected in manifest.files:
            target = tmp / expected.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                source.download(location.object_url(expected.path), target)
            except MissingObjectError as exc:
                raise ModelFetchError(f"{url}: {expected.path} is in the manifest but not in storage") from exc
            check_file(url, expected, target)
        (tmp / MANIFEST_FILE).write_bytes(raw)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(url: str, source: ObjectSource) -> tuple[ModelLocation, ModelManifest, bytes]:
    location = locate(url)
    try:
        raw = source.read(location.manifest_url)
    except MissingObjectError as exc:
        raise ManifestMissingError(
            f"{url}: no {MANIFEST_FILE} at {location.manifest_url} (push the model with `lcmq models push`; "
            "a push in progress writes it last)"
        ) from exc
    manifest = parse_manifest(raw, url)
    if location.file is not None and manifest.file(location.file) is None:
        raise ModelFetchError(f"{url}: {location.file} is not listed in {location.manifest_url}")
    return location, manifest, raw


def fetch_model(url: str, models_dir: Path, source: ObjectSource) -> Fetched:
    """The local copy of a pushed model, downloaded and verified on first use on this host."""
    started = time.monotonic()
    location, manifest, raw = read_manifest(url, source)
    entry = cache_entry(models_dir, location, manifest_digest(raw))
    outcome: Outcome = "hit"
    waited = 0.0
    if not intact(entry, manifest):
        with host_lock(lock_path(entry)) as waited:
            if not intact(entry, manifest):  # another process may have finished it meanwhile
                _download(url, location, manifest, raw, entry, source)
                outcome = "miss"
    seconds = time.monotonic() - started
    path = entry / location.file if location.file else entry
    log.info(
        "model downloaded" if outcome == "miss" else "model cache hit",
        extra={
            "url": url,
            "path": str(path),
            "files": len(manifest.files),
            "bytes": manifest.total_bytes,
            "seconds": round(seconds, 3),
            "waited_s": round(waited, 3),
            "pid": os.getpid(),
        },
    )
    return Fetched(url, path, outcome, seconds, waited)


def cache_summary(fetched: Iterable[Fetched]) -> str | None:
    """What a worker row shows: "hit" (all cached), "miss" (all downloaded), "partial", or None
    (no s3:// model)."""
    outcomes = {f.outcome for f in fetched}
    if not outcomes:
        return None
    return outcomes.pop() if len(outcomes) == 1 else "partial"
