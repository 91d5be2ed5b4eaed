"""Export a finished batch as a training dataset: Hugging Face `imagefolder` or `webdataset` shards.

The images come from the batch's storage one at a time, in manifest order (the manifest
records are the export's rows), and go to a local folder or an s3:// prefix. Nothing holds the
batch: one image, or one shard in a local temporary file, at a time.

A half-written export never looks complete:
- imagefolder: the images first, `metadata.jsonl` (which `datasets` needs for the prompts) last;
- webdataset: each shard is built locally and stored whole under its final name, and the
  shard list (`export.json`) is written last.
Both end with `export.json` (what was exported, how many images, which shards), so "export.json
is there" means "the export finished". The destination must hold nothing when the export starts.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lcmq.errors import InputError, MissingObjectError, PermanentError
from lcmq.formats import FORMATS
from lcmq.manifest import records
from lcmq.repository import Repository
from lcmq.storage import FileStorage, Storage, sha256_hex, storage_from_url

log = logging.getLogger("lcmq.export")

EXPORT_FORMATS = ("imagefolder", "webdataset")
DEFAULT_SHARD_SIZE = 1000
MAX_SHARD_SIZE = 1_000_000
METADATA_FILE = "metadata.jsonl"
SUMMARY_FILE = "export.json"
SHARD_NAME = "shard-{:06d}.tar"


class ExportError(PermanentError):
    """An image in storage is missing, or not the one its row recorded (sha256 mismatch)."""


def check_export(batch_id: str, fmt: Any, to: Any, shard_size: Any) -> None:
    if fmt not in EXPORT_FORMATS:
        raise InputError(batch_id, None, "--format", f"must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise InputError(
            batch_id, None, "--shard-size", f"must be an integer between 1 and {MAX_SHARD_SIZE} (got {shard_size!r})"
        )
    if not isinstance(to, (str, Path)) or not str(to).strip():
        raise InputError(batch_id, None, "--to", "must be a folder or an s3://bucket/prefix URL")
    text = str(to)
    if "://" in text and not text.startswith(("s3://", "file://")):
        raise InputError(batch_id, None, "--to", f"must be a folder or an s3://bucket/prefix URL (got {text!r})")


def destination(to: str | Path, settings) -> Storage:
    """A folder (made if missing) or an s3:// prefix, through lcmq's storage."""
    text = str(to)
    if text.startswith(("s3://", "file://")):
        return storage_from_url(
            text, settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout_s, settings.s3_max_attempts
        )
    return FileStorage(Path(text).expanduser())


def _image(source: Storage, record: dict[str, Any]) -> bytes:
    try:
        data = source.get(record["key"])
    except MissingObjectError as exc:
        raise ExportError(
            f"{record['url']}: the image of job {record['job_id']} (row {record['index']}) is "
            f"missing from storage; the export stopped without {SUMMARY_FILE}"
        ) from exc
    if sha256_hex(data) != record["sha256"]:
        raise ExportError(f"{record['url']}: sha256 differs from the one recorded for job {record['job_id']}")
    return data


def imagefolder_row(record: dict[str, Any], file_name: str) -> dict[str, Any]:
    """A metadata.jsonl row: flat, one type per column whatever the batch holds, so the JSON
    loader of `datasets` reads every batch as-is. The row's own metadata keys vary from row to
    row, so they travel as one JSON string."""
    model = record["model"]
    return {
        "file_name": file_name,
        "prompt": record["prompt"],
        "negative_prompt": record["negative_prompt"],
        "seed": record["seed"],
        "steps": record["steps"],
        "guidance": float(record["guidance"]),
        "width": record["width"],
        "height": record["height"],
        "profile": record["profile"],
        "model_family": model["family"],
        "model_base": model["base"],
        "model_lcm_lora": model["lcm_lora"],
        "format": record["format"],
        "index": record["index"],
        "key": record["key"],
        "sha256": record["sha256"],
        "job_id": record["job_id"],
        "render_ms": record["render_ms"],
        "batch_size": record["batch_size"],
        "metadata": json.dumps(record["metadata"], sort_keys=True),
    }


def _export_imagefolder(rows: Iterator[dict[str, Any]], source: Storage, dest: Storage, work: Path) -> dict:
    metadata = work / METADATA_FILE
    count = 0
    with metadata.open("w", encoding="utf-8") as fh:
        for record in rows:
            name = record["key"].rsplit("/", 1)[-1]  # 000000.png: ids only, unique in the batch
            dest.put(name, _image(source, record), FORMATS[record["format"]].content_type, {})
            fh.write(json.dumps(imagefolder_row(record, name), ensure_ascii=False) + "\n")
            count += 1
    dest.put_file(METADATA_FILE, metadata, "application/x-ndjson")  # last: the images are all there
    return {"images": count, "files": [METADATA_FILE]}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the same batch gives the same shard bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _export_webdataset(
    rows: Iterator[dict[str, Any]], source: Storage, dest: Storage, work: Path, shard_size: int
) -> dict:
    shards: list[str] = []
    count = 0
    tar: tarfile.TarFile | None = None
    path = work / "shard.tar"

    def close_shard() -> None:
        assert tar is not None  # called only with a shard open
        tar.close()
        name = SHARD_NAME.format(len(shards))
        dest.put_file(name, path, "application/x-tar")  # whole, under its final name
        shards.append(name)

    for record in rows:
        if tar is None:
            tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        # webdataset groups a sample's files by the name up to the first dot: the row index.
        sample = f"{record['index']:06d}"
        _add(tar, f"{sample}.{record['key'].rsplit('.', 1)[-1]}", _image(source, record))
        _add(tar, f"{sample}.json", json.dumps(record, default=str, ensure_ascii=False).encode())
        _add(tar, f"{sample}.txt", record["prompt"].encode())
        count += 1
        if count % shard_size == 0:
            close_shard()
            tar = None
    if tar is not None:
        close_shard()
    return {"images": count, "shards": shards}


def export(
    repo: Repository,
    source: Storage,
    batch_id: str,
    fmt: str,
    to: str | Path,
    settings,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """Export a finished batch's succeeded images; returns the summary also stored as export.json."""
    check_export(batch_id, fmt, to, shard_size)
    repo.get_batch(batch_id)  # NotFoundError for an unknown id
    if repo.manifest_version(batch_id) is None:
        raise InputError(
            batch_id,
            None,
            None,
            f"the batch has queued or running jobs; export it once it is finished (`lcmq status {batch_id} --watch`)",
        )
    dest = destination(to, settings)
    existing = dest.list_keys("")
    if existing:
        raise InputError(
            batch_id,
            None,
            "--to",
            f"{to} already holds {len(existing)} file(s) (e.g. {existing[0]}); export into an empty folder or prefix",
        )
    rows = records(repo, source, batch_id)
    with tempfile.TemporaryDirectory(prefix="lcmq-export-") as folder:
        if fmt == "imagefolder":
            done = _export_imagefolder(rows, source, dest, Path(folder))
        else:
            done = _export_webdataset(rows, source, dest, Path(folder), shard_size)
        summary = {"batch_id": batch_id, "format": fmt, "to": str(to), **done}
        if fmt == "webdataset":
            summary["shard_size"] = shard_size
        summary_path = Path(folder) / SUMMARY_FILE
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        dest.put_file(SUMMARY_FILE, summary_path, "application/json")  # last of all: the export is complete
    log.info("batch exported", extra={"batch_id": batch_id, "format": fmt, "images": summary["images"]})
    return summary
