"""Object storage behind one small interface: `s3://bucket/prefix` or `file:///dir`.

Keys are built by lcmq from ids only (`<batch_id>/<index:06d>.png`); they are checked here
anyway so no path can leave the storage root.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from lcmq.errors import (
    ConfigError,
    LcmqError,
    MissingObjectError,
    PermanentStorageError,
    StorageError,
)

MANIFEST_NAME = "manifest.jsonl"
TEMP_PREFIX = ".tmp-"  # a file being written under a FileStorage root: never listed, never an object
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
# What S3 answers for an object that is not there (GET: NoSuchKey; HEAD has no body: its status).
_S3_MISSING_CODES = ("NoSuchKey", "NotFound", "404")


def check_key(key: str) -> str:
    if not _SAFE_KEY.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise PermanentStorageError(f"unsafe object key {key!r}")
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's sha256, read in blocks (a batch file or an init image is never held whole)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_whole(target: Path, content: bytes | Path) -> None:
    """Write bytes (or copy a local file) to target: into a temporary file, then renamed over it, so
    a reader never sees half an object and a crash leaves no torn file under the real name.

    The temporary file is created with mode 0666 and the process umask applies (0644 under umask
    022), as for any file a program writes: `tempfile.mkstemp` would make it 0600, and a web server
    or a training job running as another user could not read the images, manifests or exports.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # not inherited (PEP 446)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, Path):
                with content.open("rb") as source:
                    shutil.copyfileobj(source, fh)
            else:
                fh.write(content)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reading_error(path: Path, exc: OSError) -> LcmqError:
    """An OSError met while reading or removing a stored file, as lcmq's error, by its class: a
    missing file or a refusal stays so on a retry; anything else (an I/O error) may pass."""
    message = f"{path}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        return MissingObjectError(f"no such object {path}")
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return PermanentStorageError(message)
    return StorageError(message)


class Storage(ABC):
    """Where images go. `key` is relative to the storage root given by the URL."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: Path, content_type: str) -> None:
        """Store a local file (a manifest, a shard) without reading it into memory; readers see
        the old object or the whole new one, never a part."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove an object (no error when it is not there). Only for objects lcmq put moments
        ago and must take back: a refused batch's uploaded init images."""
        raise NotImplementedError

    @abstractmethod
    def stored_sha256(self, key: str) -> str | None:
        """The sha256 of the object at key, or None when there is none."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Keys under prefix (a folder: `b1` lists `b1/...`); an empty prefix lists everything."""

    @abstractmethod
    def url(self, key: str) -> str:
        """A URL a user can open or copy: s3://bucket/prefix/key or file:///abs/path."""

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """An https URL that lets whoever holds it GET the object for `expires_s` seconds, or
        None where the storage has no such URLs (file://: the dashboard serves those itself)."""
        return None

    def presigned_put_url(self, key: str, expires_s: int, content_type: str) -> str | None:
        """An https URL that lets whoever holds it PUT the object at `key` (that key only) for
        `expires_s` seconds, sending `Content-Type: content_type`; None where the storage has no
        such URLs (file://). Edge workers upload their images through these."""
        return None

    def read_sha256(self, key: str, max_bytes: int) -> str | None:
        """The sha256 of the object's bytes, read back in blocks (not its metadata: whoever
        uploaded it chose that); None when there is no object. PermanentStorageError for an
        object over `max_bytes` (an upload that is no image of ours)."""
        try:
            data = self.get(key)
        except MissingObjectError:
            return None
        if len(data) > max_bytes:
            raise PermanentStorageError(f"object {key!r} is larger than {max_bytes} bytes")
        return sha256_hex(data)

    def batch_key(self, batch_id: str, index: int, ext: str = "png") -> str:
        return check_key(f"{batch_id}/{index:06d}.{ext}")

    def job_image_key(self, job_key: str | None, batch_id: str, index: int, ext: str) -> str:
        """Where a job's image goes, the one rule Celery workers and the edge gateway share:
        catalog jobs carry a stable per-item key (set by the producer), other jobs get one made
        of ids. Deterministic, so a retried upload lands on the same object."""
        return check_key(job_key) if job_key else self.batch_key(batch_id, index, ext)

    def batch_url(self, batch_id: str) -> str:
        return self.url(check_key(batch_id)) + "/"

    def item_key(self, catalog: str, item_id: str, ext: str = "png") -> str:
        """A catalog item's object: the same key at every run, replaced when the item changes."""
        return check_key(f"{catalog}/{item_id}.{ext}")

    def catalog_url(self, catalog: str) -> str:
        return self.url(check_key(catalog)) + "/"

    def manifest_key(self, batch_id: str) -> str:
        """manifest.jsonl sits next to the batch's images, under its output prefix."""
        return check_key(f"{batch_id}/{MANIFEST_NAME}")


class FileStorage(Storage):
    def __init__(self, root: Path):
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise PermanentStorageError(f"key {key!r} escapes the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        path = self._path(key)
        try:
            _write_whole(path, data)
        except OSError as exc:
            raise StorageError(f"writing {path}: {exc}") from exc

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self._path(key)
        try:
            _write_whole(target, path)
        except OSError as exc:
            raise StorageError(f"writing {target}: {exc}") from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _reading_error(path, exc) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise _reading_error(path, exc) from exc

    def read_sha256(self, key: str, max_bytes: int) -> str | None:
        path = self._path(key)
        try:
            if path.stat().st_size > max_bytes:
                raise PermanentStorageError(f"object {key!r} is larger than {max_bytes} bytes")
        except FileNotFoundError:
            return None
        return self.stored_sha256(key)

    def stored_sha256(self, key: str) -> str | None:
        path = self._path(key)
        try:
            return file_sha256(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _reading_error(path, exc) from exc

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        try:
            return sorted(
                str(p.relative_to(self.root))
                for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(TEMP_PREFIX)
            )
        except OSError as exc:
            raise _reading_error(base, exc) from exc

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """The file of `key`, symlinks resolved; PermanentStorageError for an unsafe key or one
        whose file lies outside the root (`..`, an absolute path, a symlink out)."""
        return self._path(key)


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        region: str,
        timeout_s: float = 30,
        max_attempts: int = 3,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        try:
            self.client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    connect_timeout=timeout_s,
                    read_timeout=timeout_s,
                    max_pool_connections=16,
                ),
            )
        except ValueError as exc:  # botocore's "Invalid endpoint", a malformed region name
            raise ConfigError(f"s3 endpoint {endpoint_url!r}, region {region!r}: {exc}") from exc

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            self._raise_client_error(what, kwargs.get("Key", kwargs.get("Prefix", "")), exc)
        except BotoCoreError as exc:  # connection refused, timeouts, broken responses
            raise StorageError(f"s3 {what}: {exc}") from exc

    def _raise_client_error(self, what: str, key: str, exc) -> None:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        message = f"s3 {what} s3://{self.bucket}/{key}: {code} ({status})"
        if code in _S3_MISSING_CODES:
            raise MissingObjectError(message) from exc
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
            raise StorageError(message) from exc
        raise PermanentStorageError(message) from exc

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        self._call(
            "put",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._object_key(key),
            Body=data,
            ContentType=content_type,
            Metadata=metadata,
        )

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        # upload_file goes multipart above 8 MB; the object appears only when the upload completes.
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            self._call(
                "put",
                self.client.upload_file,
                Filename=str(path),
                Bucket=self.bucket,
                Key=object_key,
                ExtraArgs={"ContentType": content_type},
            )
        except S3UploadFailedError as exc:  # wraps the ClientError that says whether to retry
            if isinstance(exc.__context__, ClientError):
                self._raise_client_error("put", object_key, exc.__context__)
            raise StorageError(f"s3 put s3://{self.bucket}/{object_key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        return self._call("get", self._get_body, Bucket=self.bucket, Key=self._object_key(key))

    def _get_body(self, **request) -> bytes:
        # The body is read inside _call: a connection lost mid-body is a BotoCoreError too.
        return self.client.get_object(**request)["Body"].read()

    def _head(self, key: str) -> dict | None:
        try:
            return self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._object_key(key))
        except MissingObjectError:  # HEAD has no body: a missing bucket is a 404 here as well
            return None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._object_key(key))

    def stored_sha256(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def list_keys(self, prefix: str) -> list[str]:
        if prefix.strip("/"):
            full = self._object_key(prefix.rstrip("/")) + "/"
        else:
            full = self.prefix + "/" if self.prefix else ""
        keys: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: dict[str, str] = {}
        while True:
            page = self._call("list", self.client.list_objects_v2, Bucket=self.bucket, Prefix=full, **token)
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        # Signed locally (no request is made): the URL names the endpoint the API uses.
        return self.presigned_get(self.bucket, self._object_key(key), expires_s)

    def presigned_get(self, bucket: str, object_key: str, expires_s: int) -> str:
        """A GET URL of any object these credentials may read (an init image or a LoRA named
        by its s3:// URL, in this bucket or another)."""
        return self._call(
            "presign",
            self.client.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": bucket, "Key": object_key},
            ExpiresIn=expires_s,
        )

    def presigned_put_url(self, key: str, expires_s: int, content_type: str) -> str | None:
        # The Content-Type is signed: the upload must send that header, and nothing but an
        # object at exactly this key can be written with the URL.
        return self._call(
            "presign",
            self.client.generate_presigned_url,
            ClientMethod="put_object",
            Params={"Bucket": self.bucket, "Key": self._object_key(key), "ContentType": content_type},
            ExpiresIn=expires_s,
        )

    def read_sha256(self, key: str, max_bytes: int) -> str | None:
        head = self._head(key)
        if head is None:
            return None
        if head.get("ContentLength", 0) > max_bytes:  # refused before a byte is read
            raise PermanentStorageError(f"object {key!r} is larger than {max_bytes} bytes")
        return self._call("get", self._hash_body, Bucket=self.bucket, Key=self._object_key(key), max_bytes=max_bytes)

    def _hash_body(self, max_bytes: int, **request) -> str:
        digest, seen = hashlib.sha256(), 0
        for block in self.client.get_object(**request)["Body"].iter_chunks(1 << 20):
            seen += len(block)
            if seen > max_bytes:  # replaced by a larger object since the HEAD
                raise PermanentStorageError(f"object {request['Key']!r} is larger than {max_bytes} bytes")
            digest.update(block)
        return digest.hexdigest()


def read_url(
    url: str, endpoint_url: str | None = None, region: str = "us-east-1", timeout_s: float = 30, max_attempts: int = 3
) -> bytes:
    """The bytes of one object named by a full URL (a catalog): s3://bucket/key or file:///path.

    Unlike `Storage.get`, the key is the user's own (not one lcmq built), so it is not checked.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(url[len("file://") :])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _reading_error(path, exc) from exc
    if parsed.scheme == "s3" and parsed.netloc and parsed.path.strip("/"):
        store = S3Storage(parsed.netloc, "", endpoint_url, region, timeout_s, max_attempts)
        return store._call("get", store._get_body, Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
    raise ConfigError(f"{url!r}: use s3://bucket/key or file:///path")


def storage_from_settings(settings) -> Storage:
    """The storage a process's settings name (both sides use this one door)."""
    return storage_from_url(
        settings.storage_url,
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_timeout_s,
        settings.s3_max_attempts,
    )


def storage_from_url(
    url: str, endpoint_url: str | None = None, region: str = "us-east-1", timeout_s: float = 30, max_attempts: int = 3
) -> Storage:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        # file:///abs/dir is absolute; file://renders is relative to the working directory.
        raw = url[len("file://") :]
        return FileStorage(Path(raw or "."))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"storage URL {url!r} names no bucket")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url, region, timeout_s, max_attempts)
    raise ConfigError(f"storage URL {url!r}: use s3://bucket/prefix or file:///dir")
