"""Style LoRAs: the `loras` a job, a batch (`--lora NAME=PATH[:WEIGHT]`) or a profile lists.

A set is a list of `{"name", "path", "weight"}`. It is checked at submit (the name an
identifier other than `lcm`, the weight finite and within ±MAX_WEIGHT, the path non-empty and,
when local, existing) and stored on the job in canonical form: sorted by name, local paths made
absolute. The set is part of a job's render shape, so jobs travel and render with others of the
same set (the worker activates one set per pipeline call; worker/adapters.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lcmq.errors import PermanentError

LCM_ADAPTER = "lcm"  # the LCM-LoRA's own adapter name in the worker: never a style's
MAX_WEIGHT = 2.0  # past ±2 a style LoRA on top of the LCM-LoRA only burns the image
MAX_LORAS = 8  # per job: each active adapter costs every UNet step a little
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KEYS = {"name", "path", "weight"}


class LoraProblem(PermanentError):
    """A LoRA set is invalid; the caller names the source, line and field (as an InputError)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_path(path: str, base_dir: Path | None) -> str:
    """A LoRA path as stored: s3:// kept as is; file:// and plain paths made absolute (relative
    ones against base_dir: the batch file's folder, else the working directory)."""
    if path.startswith("s3://"):
        parsed = urlparse(path)
        if not parsed.netloc or not parsed.path.strip("/"):
            raise LoraProblem(f"path {path!r} must be s3://bucket/key")
        return path
    local = path[len("file://") :] if path.startswith("file://") else path
    resolved = Path(os.path.expanduser(local))  # Path.expanduser raises for an unknown ~user
    if not resolved.is_absolute():
        resolved = (base_dir or Path.cwd()) / resolved
    return os.path.normpath(resolved)


def check_lora(item: Any, base_dir: Path | None = None, exists=os.path.exists) -> dict[str, Any]:
    """One entry, checked and in canonical form: {"name", "path", "weight"} (weight a float)."""
    if not isinstance(item, Mapping):
        raise LoraProblem(f"each entry must be an object with name, path and weight (got {type(item).__name__})")
    unknown = set(item) - _KEYS
    if unknown:
        raise LoraProblem(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; use name, path, weight")
    name, path, weight = item.get("name"), item.get("path"), item.get("weight", 1.0)
    if not isinstance(name, str) or not _NAME.match(name):
        raise LoraProblem(f"name must be an identifier of letters, digits and _ (got {name!r})")
    if name == LCM_ADAPTER:
        raise LoraProblem(f"name {LCM_ADAPTER!r} is the LCM-LoRA's own; pick another")
    if not isinstance(path, str) or not path.strip():
        raise LoraProblem(f"{name}: path must be a non-empty string")
    if any(c in path for c in "\x00\n\r"):
        raise LoraProblem(f"{name}: path contains a control character")
    if not _is_number(weight):
        raise LoraProblem(f"{name}: weight must be a number (got {weight!r})")
    weight = float(weight)
    if not math.isfinite(weight) or not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        raise LoraProblem(f"{name}: weight must be between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g} (got {weight:g})")
    resolved = resolve_path(path.strip(), base_dir)
    if not resolved.startswith("s3://") and not exists(resolved):
        raise LoraProblem(f"{name}: no such file or folder {resolved}")
    return {"name": name, "path": resolved, "weight": weight}


def check_loras(
    value: Any, base_dir: Path | None = None, from_text: bool = False, exists=os.path.exists
) -> tuple[dict[str, Any], ...]:
    """A whole set: a list of entries (JSON text in a CSV cell), no name or path twice.
    Returned sorted by name: the same set written in another order is the same render shape."""
    if from_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise LoraProblem(
                'must be a JSON list like [{"name": "ink", "path": "ink.safetensors", "weight": 0.8}]'
            ) from None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise LoraProblem(f"must be a list of {{name, path, weight}} objects (got {type(value).__name__})")
    if len(value) > MAX_LORAS:
        raise LoraProblem(f"at most {MAX_LORAS} LoRAs per job (got {len(value)})")
    checked = [check_lora(item, base_dir, exists) for item in value]
    for key in ("name", "path"):
        seen: set[str] = set()
        for entry in checked:
            if entry[key] in seen:
                raise LoraProblem(f"{key} {entry[key]!r} given twice")
            seen.add(entry[key])
    return tuple(sorted(checked, key=lambda e: e["name"]))


def parse_lora_flag(text: str) -> dict[str, Any]:
    """`NAME=PATH[:WEIGHT]` from the command line. The weight is the text after the last ':'
    when it reads as a number, so s3://bucket/key and C:-less paths with colons still work."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise LoraProblem(f"expected NAME=PATH[:WEIGHT] (got {text!r})")
    path, weight = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    return {"name": name.strip(), "path": path.strip(), "weight": weight}


def lora_key(loras: Sequence[Mapping[str, Any]] | None) -> str:
    """The set as one canonical string for render shapes ("" for none): hashable, orderable."""
    if not loras:
        return ""
    return json.dumps(
        [[e["name"], e["path"], float(e["weight"])] for e in sorted(loras, key=lambda e: e["name"])],
        separators=(",", ":"),
    )
