"""Models kept in object storage: the manifest `lcmq models push` writes and workers check.

A pushed model is a prefix of objects (`s3://bucket/prefix/models/NAME/`): the model's files
under their relative paths, and `lcmq-model.json`, written LAST, which lists every file with
its size and sha256. A reader that finds the manifest finds every file it names (a push
deletes an older manifest before it uploads anything). A profile names the prefix (a diffusers
folder: `s3://bucket/models/NAME/`) or, for a model pushed as one file, the file itself
(`s3://bucket/models/NAME/model.safetensors`, whose manifest sits beside it).

This is the contract both sides share: `lcmq models push` (the face) builds and uploads it,
the worker's fetcher (worker/model_fetch.py) reads and checks it. No torch here.

Manifest, version 1 (JSON, one object):

    {"format": "lcmq-model", "version": 1, "name": "shop-v3", "kind": "folder",
     "files": [{"path": "model_index.json", "size": 541, "sha256": "9f2c…"}, …]}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from lcmq.errors import ProfileError
from lcmq.profiles import SINGLE_FILE_SUFFIXES, Profile
from lcmq.settings import Settings
from lcmq.storage import file_sha256

MANIFEST_FILE = "lcmq-model.json"
MANIFEST_FORMAT = "lcmq-model"
MANIFEST_VERSION = 1
KINDS = ("folder", "file")
# A model's name becomes a key segment; a file's relative path becomes a key and a local path.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class ModelFetchError(ProfileError):
    """A pushed model cannot be used: no manifest, a file that does not match it, a malformed
    manifest. The message names the model URL and the file; the download is never used."""


class ManifestMissingError(ModelFetchError):
    """No lcmq-model.json where the URL says the model is (not pushed, or a push not finished)."""


@dataclass(frozen=True)
class ManifestFile:
    path: str  # relative, '/'-separated, no '..'
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelManifest:
    name: str
    kind: str  # "folder" (a diffusers folder, a LoRA folder) or "file" (one checkpoint)
    files: tuple[ManifestFile, ...]
    version: int = MANIFEST_VERSION

    def to_bytes(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "name": self.name,
            "kind": self.kind,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return (json.dumps(body, indent=1) + "\n").encode()

    def file(self, path: str) -> ManifestFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ProfileError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return name


def check_relative_path(path: str) -> str:
    """A file's path inside a model: safe as an object key and as a path under the cache."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or not all(_PATH_PART.match(part) for part in parts):
        raise ModelFetchError(
            f"file path {path!r}: use relative paths of letters, digits, '.', '_' and '-' (no hidden files, no '..')"
        )
    return path


def manifest_digest(data: bytes) -> str:
    """The identity of a pushed model's content: the sha256 of its manifest as stored."""
    return hashlib.sha256(data).hexdigest()


def _problem(where: str, message: str) -> ModelFetchError:
    return ModelFetchError(f"{where}: {MANIFEST_FILE}: {message}")


def _entry(where: str, item: object) -> ManifestFile:
    if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
        raise _problem(where, f"each file must be an object with path, size and sha256 (got {item!r})")
    path, size, sha = item["path"], item["size"], item["sha256"]
    if not isinstance(path, str):
        raise _problem(where, f"file path must be a string (got {path!r})")
    try:
        check_relative_path(path)
    except ModelFetchError as exc:
        raise _problem(where, str(exc)) from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _problem(where, f"{path}: size must be a non-negative integer (got {size!r})")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _problem(where, f"{path}: sha256 must be 64 lowercase hex digits (got {sha!r})")
    return ManifestFile(path, size, sha)


def parse_manifest(data: bytes, where: str) -> ModelManifest:
    """The manifest read from storage; ModelFetchError naming `where` and the field otherwise."""
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise _problem(where, f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise _problem(where, f"format must be {MANIFEST_FORMAT!r}")
    if body.get("version") != MANIFEST_VERSION:
        raise _problem(where, f"version {body.get('version')!r} is not one this lcmq reads ({MANIFEST_VERSION})")
    if body.get("kind") not in KINDS:
        raise _problem(where, f"kind must be one of {', '.join(KINDS)} (got {body.get('kind')!r})")
    files = body.get("files")
    if not isinstance(files, list) or not files:
        raise _problem(where, "files must be a non-empty list")
    entries = tuple(_entry(where, item) for item in files)
    if len({e.path for e in entries}) != len(entries):
        raise _problem(where, "a file is listed twice")
    return ModelManifest(str(body.get("name", "")), body["kind"], entries)


def local_files(source: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of a local model: every file of a folder, sorted, hidden ones
    (`.cache/`, `.lcmq-complete`, `.gitattributes`) left out; or the one file."""
    if source.is_file():
        return [(check_relative_path(source.name), source)]
    if not source.is_dir():
        raise ProfileError(f"{source}: no such file or folder")
    found = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        found.append((check_relative_path(relative.as_posix()), path))
    if not found:
        raise ProfileError(f"{source}: the folder holds no files")
    return found


def build_manifest(name: str, source: Path) -> tuple[ModelManifest, list[tuple[ManifestFile, Path]]]:
    """The manifest of a local model, and each entry's local file (reads every file once)."""
    files = [(ManifestFile(rel, path.stat().st_size, file_sha256(path)), path) for rel, path in local_files(source)]
    kind = "file" if source.is_file() else "folder"
    return ModelManifest(check_model_name(name), kind, tuple(entry for entry, _ in files)), files


@dataclass(frozen=True)
class ModelLocation:
    """Where a profile's s3:// model reference points: the pushed prefix and, for a model
    pushed as one file, that file's name inside it."""

    url: str  # as the profile wrote it
    bucket: str
    prefix: str  # no leading or trailing '/'
    file: str | None  # the single file the reference names, else None (the whole folder)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @property
    def manifest_url(self) -> str:
        return f"s3://{self.bucket}/{self.key(MANIFEST_FILE)}"

    def object_url(self, relative: str) -> str:
        return f"s3://{self.bucket}/{self.key(relative)}"


def is_remote(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith("s3://")


def locate(url: str) -> ModelLocation:
    """`s3://bucket/prefix/` (a folder) or `s3://bucket/prefix/file.safetensors` (one file)."""
    parsed = urlparse(url)
    path = parsed.path.strip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not path:
        raise ProfileError(f"{url!r}: a pushed model is s3://bucket/prefix/ or s3://bucket/prefix/model.safetensors")
    if path.endswith(SINGLE_FILE_SUFFIXES) and not url.endswith("/"):
        prefix, _, name = path.rpartition("/")
        return ModelLocation(url, parsed.netloc, prefix, name)
    return ModelLocation(url, parsed.netloc, path, None)


def pushed_url(location_bucket: str, prefix: str, manifest: ModelManifest) -> str:
    """The URL a profile names for a pushed model: the folder, or the single file."""
    base = f"s3://{location_bucket}/{prefix.strip('/')}/"
    return base + manifest.files[0].path if manifest.kind == "file" else base


@dataclass(frozen=True)
class Pushed:
    url: str  # what to put in a profile
    manifest: ModelManifest


def push_destination(name: str, to: str | None, storage_url: str) -> tuple[str, str]:
    """(bucket, prefix) a push writes to: `--to s3://bucket/prefix/`, else `<storage root>/models/NAME/`."""
    target = to or (
        f"{storage_url.rstrip('/')}/models/{check_model_name(name)}/" if storage_url.startswith("s3://") else None
    )
    if target is None:
        raise ProfileError(f"the storage is {storage_url}, not s3://: give --to s3://bucket/prefix/")
    parsed = urlparse(target)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise ProfileError(f"--to {target!r}: must be s3://bucket/prefix/")
    return parsed.netloc, parsed.path.strip("/")


def push_model(name: str, source: Path, to: str | None, settings: Settings) -> Pushed:
    """Upload a local model and its manifest. The old manifest goes first and the new one is
    written last, so a worker reading the prefix mid-push finds no manifest (and waits for
    none: it refuses the model) rather than a manifest whose files are half replaced."""
    from lcmq.storage import S3Storage

    bucket, prefix = push_destination(check_model_name(name), to, settings.storage_url)  # before reading GBs
    manifest, files = build_manifest(name, source)
    store = S3Storage(
        bucket, prefix, settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout_s, settings.s3_max_attempts
    )
    store.delete(MANIFEST_FILE)
    for entry, path in files:
        store.put_file(entry.path, path, "application/octet-stream")
    store.put(MANIFEST_FILE, manifest.to_bytes(), "application/json", {"sha256": manifest_digest(manifest.to_bytes())})
    return Pushed(pushed_url(bucket, prefix, manifest), manifest)


# The profile fields that may name s3:// models.
PROFILE_MODEL_FIELDS = ("base", "config", "vae", "tiny_vae", "lcm_lora")


def profile_model_urls(profile: Profile) -> set[str]:
    """Every s3:// model a profile names: base, config, vae, tiny_vae, LCM-LoRA and its style LoRAs. The
    gateway presigns GETs for these and nothing else (docs/edge.md, "Models")."""
    refs = [getattr(profile, field) for field in PROFILE_MODEL_FIELDS]
    refs += [lora.get("path") for lora in profile.loras]
    return {str(ref) for ref in refs if is_remote(ref)}
