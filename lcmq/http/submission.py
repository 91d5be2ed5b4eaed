"""`POST /v1/batches`'s body, JSON or multipart, as lcmq.api.submit's arguments.

Only parsing: the rows and options are checked by lcmq.api, the same as for `lcmq submit`. The
CLI's spellings are read by the CLI's own parsers (`--matrix NAME=VALUES`: lcmq.matrix.parse_axis;
`--lora NAME=PATH[:WEIGHT]`: lcmq.loras.parse_lora_flag).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from lcmq.errors import InputError
from lcmq.http.schemas import BatchOptionsIn, SubmitForm, SubmitJson
from lcmq.loras import LoraProblem, parse_lora_flag
from lcmq.matrix import parse_axis

BATCH_FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
UPLOAD_CHUNK = 1 << 20
M = TypeVar("M", bound=BaseModel)


def invalid(exc: ValidationError, source: str) -> InputError:
    """pydantic's first complaint as the CLI's kind of error: the field it is about, named."""
    first = exc.errors()[0]
    location = [str(part) for part in first["loc"]]
    line = None
    if len(location) >= 2 and location[0] == "rows" and location[1].isdigit():
        line = int(location[1]) + 1  # a row's 1-based position, as the CLI's line number
    return InputError(source, line, ".".join(location) or None, first["msg"])


def validated(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, source) from None


def options(body: BatchOptionsIn) -> dict[str, Any]:
    """api.submit's keyword arguments of the options common to both bodies."""
    return {
        "model": body.model,
        "steps": body.steps,
        "guidance": body.guidance,
        "negative_prompt": body.negative_prompt,
        "width": body.width,
        "height": body.height,
        "seed": body.seed,
        "name": body.name,
        "image_format": body.format,
        "quality": body.quality,
        "priority": body.priority,
        "chunk_size": body.chunk_size,
        "webhook_url": body.webhook_url,
    }


def matrix_axes(given: Any, source: str) -> Any:
    """A mapping of axes as it is; a list of `NAME=VALUES` (the CLI's spelling) parsed."""
    if not isinstance(given, list):
        return given
    return [parse_axis(text, source) for text in given]


def lora_entries(given: list[Any] | None, source: str) -> list[Any] | None:
    """`{name, path, weight}` objects as they are; `NAME=PATH[:WEIGHT]` strings parsed."""
    if given is None:
        return None
    entries = []
    for entry in given:
        if not isinstance(entry, str):
            entries.append(entry)
            continue
        try:
            entries.append(parse_lora_flag(entry))
        except LoraProblem as exc:
            raise InputError(source, None, "loras", str(exc)) from None
    return entries


def from_json(data: Any) -> tuple[list[Any], dict[str, Any]]:
    """(rows, the other arguments of api.submit) from a JSON body."""
    source = "<rows>"
    body = validated(SubmitJson, data, source)
    arguments = options(body) | {
        "matrix": matrix_axes(body.matrix, source),
        "loras": lora_entries(body.loras, source),
    }
    return body.rows, arguments


def _form_list(form: FormData, name: str, source: str) -> list[Any] | None:
    """A repeatable field: each value `NAME=...` text, or a JSON list/object of several."""
    values: list[Any] = []
    for raw in form.getlist(name):
        if not isinstance(raw, str):
            raise InputError(source, None, name, "must be a text field, not a file")
        text = raw.strip()
        if text.startswith(("[", "{")):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(source, None, name, f"invalid JSON: {exc}") from None
            values.extend(
                parsed.items() if isinstance(parsed, dict) else parsed if isinstance(parsed, list) else [parsed]
            )
        elif text:
            values.append(text)
    return values or None


def _matrix_from_form(values: list[Any] | None, source: str) -> Any:
    if values is None:
        return None
    return [
        parse_axis(v, source) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else v for v in values
    ]


def form_arguments(form: FormData, filename: str) -> dict[str, Any]:
    """api.submit's arguments (but the rows) from a multipart form's fields."""
    fields = {key: value for key, value in form.items() if key not in ("file", "matrix", "loras") and value != ""}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise InputError(filename, None, key, "must be a text field, not a file")
    body = validated(SubmitForm, fields | {"file": b""}, filename)
    return options(body) | {
        "matrix": _matrix_from_form(_form_list(form, "matrix", filename), filename),
        "loras": lora_entries(_form_list(form, "loras", filename), filename),
    }


def upload_of(form: FormData) -> UploadFile:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InputError("request", None, "file", "a multipart submit needs the prompt file in the field `file`")
    return upload


def upload_name(upload: UploadFile) -> str:
    """The uploaded file's own name (no folders), which errors are reported against."""
    name = PurePath((upload.filename or "").replace("\\", "/")).name
    if PurePath(name).suffix.lower() not in BATCH_FILE_SUFFIXES:
        raise InputError(name or "request", None, "file", "must be a .txt, .jsonl or .csv file (by its name)")
    return name


@contextmanager
def saved_upload(upload: UploadFile, name: str) -> Iterator[Path]:
    """The upload as a file of its own name in a temporary folder, removed afterwards, so the
    CLI's file parser reads it (its format is chosen by the suffix)."""
    with TemporaryDirectory(prefix="lcmq-upload-") as folder:
        path = Path(folder) / name
        with path.open("wb") as out:
            while chunk := upload.file.read(UPLOAD_CHUNK):
                out.write(chunk)
        yield path


def reported_against(exc: InputError, saved: Path, name: str) -> InputError:
    """An error about the saved copy, named after the uploaded file instead."""
    if exc.source == str(saved):
        return InputError(name, exc.line, exc.field, exc.message)
    return exc
