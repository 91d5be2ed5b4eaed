"""Catalogs: items (a CSV or JSONL file, each row named by its `id`) rendered through a prompt
template such as "{name}, {color}, studio photo on white".

Each item becomes a job spec whose prompt is the template filled from the item's columns; other
job fields (seed, steps, ...) may come from the item's own columns, then the schedule's options,
then the profile. An item's render key hashes everything that decides its pixels, so a run can
render only the items whose key changed. Every item is checked before anything is written: a
missing template field, an empty, unsafe or duplicate id, or a bad value raises an InputError
naming the catalog, the item's line and the field.
"""

from __future__ import annotations

import hashlib
import string
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lcmq import keys
from lcmq.errors import InputError, LcmqError
from lcmq.models import ITEM_ID_LENGTH
from lcmq.profiles import Profile
from lcmq.settings import Settings
from lcmq.spec import FORMATS, SEED_BITS, BatchOptions, JobSpec, RowValidator, read_csv_rows, read_jsonl_rows
from lcmq.storage import read_url

ID_FIELD = "id"
# The default output format. The format (and a lossy one's quality) is part of the render key,
# so a format change re-renders; PNG catalogs keep the keys they had before formats.
OUTPUT_FORMAT = "png"


def format_identity(options: BatchOptions) -> str:
    """What the render key says of the output: "png", or "webp:85" (a quality change re-renders)."""
    if options.image_format == OUTPUT_FORMAT:
        return OUTPUT_FORMAT
    return f"{options.image_format}:{options.quality}"


CATALOG_FORMATS = ("csv", "jsonl")
_ID_CHARS = set(string.ascii_letters + string.digits + "._-")


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    line: int
    spec: JobSpec  # its seed always resolved (from the item's id unless given)
    render_key: str


# --- the template ---------------------------------------------------------------------------


def template_fields(template: Any, source: str) -> list[str]:
    """The item columns a template uses, in order; only plain `{column}` fields are allowed."""

    def fail(message: str):
        raise InputError(source, None, "--template", message)

    if not isinstance(template, str) or not template.strip():
        fail("must not be empty")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        fail(f"{exc} (write {{{{ and }}}} for literal braces)")
    fields: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            fail(f"field {{{name}}} must be a column name (letters, digits, _), not empty, an index or an attribute")
        if spec or conversion:
            fail(f"field {{{name}}} takes no conversion or format spec")
        if name not in fields:
            fields.append(name)
    if not fields:
        fail("uses no {column} of the items: every item would get the same prompt")
    return fields


def _field_text(value: Any) -> str | None:
    """A column's value as it goes into a prompt; None when it is missing or not plain data."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


# --- item ids ---------------------------------------------------------------------------------


def check_item_id(value: Any, fail) -> str:
    """An id is part of an object key (<catalog>/<id>.png): it must not leave or confuse it."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        fail(f"must be a string (got {type(value).__name__})")
    if not value.strip():
        fail("must not be empty")
    if len(value) > ITEM_ID_LENGTH:
        fail(f"must be at most {ITEM_ID_LENGTH} characters (got {len(value)})")
    for c in value:
        if unicodedata.category(c) in ("Cc", "Cs"):
            fail(f"contains a control character (U+{ord(c):04X})")
    if "/" in value or "\\" in value:
        fail(f"must not contain '/' or '\\' (got {value!r}): an id names one object, not a folder")
    if ".." in value:
        fail(f"must not contain '..' (got {value!r})")
    bad = sorted({c for c in value if c not in _ID_CHARS})
    if bad or not value[0].isalnum():
        fail(f"may hold only letters, digits, '.', '_' and '-', starting with a letter or digit (got {value!r})")
    return value


# --- seeds and render keys --------------------------------------------------------------------


def item_seed(base_seed: int | None, item_id: str) -> int:
    """An item's seed when it gives none: from its id, so reordering the catalog changes nothing."""
    digest = hashlib.sha256(f"{base_seed or 0}:{item_id}".encode()).digest()
    return int.from_bytes(digest[: SEED_BITS // 8], "big")


def render_key(
    spec: JobSpec, profile: Profile, output_format: str = OUTPUT_FORMAT, control_sha256: list[str] | None = None
) -> str:
    """A hash of what decides an item's image: prompt, negative prompt, the profile (model and LoRA
    identity included), steps, guidance, size, seed, format and, with controls, each control
    image's sha256. Not the id or the row's place."""
    return keys.render_key(spec, profile, output_format, control_sha256)


class ControlDigests:
    """The sha256 of each control image a catalog's items name, read once per run and URL (a
    shop's 5,000 items may share a few images, or each have its own)."""

    def __init__(self, settings: Settings | None):
        self.settings = settings
        self._known: dict[str, str] = {}

    def of(self, spec: JobSpec, source: str, line: int) -> list[str]:
        return [self._digest(entry["image"], source, line) for entry in spec.control]

    def _digest(self, url: str, source: str, line: int) -> str:
        if url not in self._known:
            s = self.settings
            try:
                if s is None:
                    data = read_url(url)
                else:
                    data = read_url(url, s.s3_endpoint_url, s.s3_region, s.s3_timeout_s, s.s3_max_attempts)
            except LcmqError as exc:
                if exc.transient:
                    raise
                raise InputError(source, line, "control", f"cannot read the control image {url}: {exc}") from exc
            self._known[url] = hashlib.sha256(data).hexdigest()
        return self._known[url]


# --- reading ----------------------------------------------------------------------------------


def catalog_format(location: str) -> str:
    suffix = Path(urlparse(location).path if location.startswith("s3://") else location).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt not in CATALOG_FORMATS:
        raise InputError(location, None, "--catalog", f"unknown catalog type {suffix!r}; use .csv or .jsonl")
    return fmt


def normalize_location(location: str) -> str:
    """Where a schedule finds its catalog: an s3:// URL as given, a local path made absolute (the
    scheduler runs in another working directory)."""
    if location.startswith("s3://"):
        parsed = urlparse(location)
        if not parsed.netloc or not parsed.path.strip("/"):
            raise InputError(location, None, "--catalog", "must be s3://bucket/key.csv (or .jsonl)")
    else:
        location = str(Path(location.removeprefix("file://")).expanduser().resolve())
    catalog_format(location)
    return location


def _rows(path: Path, fmt: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    return read_csv_rows(path, source, required=ID_FIELD) if fmt == "csv" else read_jsonl_rows(path, source)


def read_catalog(location: str, settings: Settings) -> list[tuple[int, dict[str, Any]]]:
    """The catalog's raw rows with their line numbers, read afresh (edits are picked up)."""
    fmt = catalog_format(location)
    if not location.startswith("s3://"):
        path = Path(location)
        if not path.is_file():
            raise InputError(location, None, None, "no such file")
        return list(_rows(path, fmt, location))
    try:
        data = read_url(
            location, settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout_s, settings.s3_max_attempts
        )
    except LcmqError as exc:
        if exc.transient:
            raise
        raise InputError(location, None, None, f"cannot read the catalog: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="lcmq-catalog-") as folder:
        path = Path(folder) / f"catalog.{fmt}"
        path.write_bytes(data)
        return list(_rows(path, fmt, location))


# --- items --------------------------------------------------------------------------------------


def build_items(
    rows: Iterable[tuple[int, dict[str, Any]]],
    template: str,
    options: BatchOptions,
    profile: Profile,
    source: str,
    from_text: bool,
    local_files: bool = True,
    settings: Settings | None = None,
) -> list[CatalogItem]:
    """Every item checked and turned into a spec with its render key; raises on the first bad one.
    `local_files`: whether items may name files of this machine (a schedule made over the HTTP API
    may not: lcmq.access.Principal.local_files)."""
    fields = template_fields(template, source)
    validator = RowValidator(options, profile, source, local_files=local_files)
    items: list[CatalogItem] = []
    digests = ControlDigests(settings)
    seen: dict[str, int] = {}
    for line, raw in rows:

        def fail(message: str, _line=line):
            raise InputError(source, _line, ID_FIELD, message)

        if ID_FIELD not in raw:
            fail("missing: every item needs an id")
        item_id = check_item_id(raw[ID_FIELD], fail)
        if item_id in seen:
            fail(f"duplicate id {item_id!r} (first on line {seen[item_id]})")
        seen[item_id] = line
        values = {}
        for name in fields:
            text = _field_text(raw.get(name))
            if text is None:
                what = "missing" if raw.get(name) in (None, "") else "not text or a number"
                raise InputError(source, line, name, f"{what}: the template uses {{{name}}}")
            bad = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
            if bad is not None:  # named as the column, not as the prompt it would end up in
                raise InputError(source, line, name, f"contains a control character (U+{ord(bad):04X})")
            values[name] = text
        row = dict(raw) | {"prompt": template.format_map(values)}
        spec = validator.validate(len(items), line, row, from_text)
        if spec.seed is None:
            spec = replace(spec, seed=item_seed(options.seed, item_id))
        control_sha256 = digests.of(spec, source, line) if spec.control else None
        key = render_key(spec, profile, format_identity(options), control_sha256)
        items.append(CatalogItem(item_id, line, spec, key))
    if not items:
        raise InputError(source, None, None, "no items in the catalog")
    return items


def load_items(
    location: str,
    template: str,
    options: BatchOptions,
    profile: Profile,
    settings: Settings,
    local_files: bool = True,
) -> list[CatalogItem]:
    """Read a catalog and check every item (see build_items)."""
    rows = read_catalog(location, settings)
    from_text = catalog_format(location) == "csv"
    return build_items(rows, template, options, profile, location, from_text, local_files, settings)
