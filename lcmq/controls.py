"""Conditioned renders: the `control` list a job, a batch (`--control NAME=IMAGE[:SCALE]`) or a
matrix sets, and the conditioning models a profile declares (`[profiles.X.controls]`).

A row's entry is `{"name", "image", "type"?, "scale"?, "preprocess"?, "low"?, "high"?, "start"?,
"end"?}`. `name` refers to the profile's model; `type` ("controlnet" or "t2i_adapter") is read
from a local model's config.json, else taken from the entry (default "controlnet"). `image` is
an s3:// URL, a file:// URL or a file name relative to the batch file, as for `init_image`.

What is stored on the job is the canonical entry: the model's reference resolved from the
profile, the image's URL, every default filled in, sorted by name. The render shape holds the
set without its images (`control_key`): jobs that share models, scales and start/end share one
pipeline call, each with its own control image.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lcmq.errors import PermanentError

CONTROLNET, T2I_ADAPTER = "controlnet", "t2i_adapter"
TYPES = (CONTROLNET, T2I_ADAPTER)
DEFAULT_SCALE = {CONTROLNET: 1.0, T2I_ADAPTER: 0.8}
MAX_SCALE = 2.0
PREPROCESS = ("none", "canny")  # what runs on the worker without a model (worker/control.py)
CANNY_LOW, CANNY_HIGH = 100, 200  # the usual thresholds on 0..255 gradients (OpenCV's examples)
MAX_CONTROLS = 4  # per job: each ControlNet costs every UNet step about half a UNet
# The config.json `_class_name` of each kind of conditioning model.
MODEL_CLASSES = {"ControlNetModel": CONTROLNET, "T2IAdapter": T2I_ADAPTER}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KEYS = {"type", "name", "image", "scale", "preprocess", "low", "high", "start", "end"}
# The fields of a canonical entry that decide the pipeline call (not the image, not its preprocessing).
SHAPE_FIELDS = ("name", "type", "model", "config", "scale", "start", "end")


class ControlProblem(PermanentError):
    """A control entry is invalid; the caller names the source, line and field."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(entry: Mapping[str, Any], key: str, default: float, low: float, high: float, name: str) -> float:
    value = entry.get(key, default)
    if value is None:
        value = default
    if isinstance(value, str):  # a CSV cell or a flag: text
        try:
            value = float(value)
        except ValueError:
            raise ControlProblem(f"{name}: {key} must be a number (got {value!r})") from None
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ControlProblem(f"{name}: {key} must be a finite number (got {value!r})")
    if not low <= float(value) <= high:
        raise ControlProblem(f"{name}: {key} must be between {low:g} and {high:g} (got {float(value):g})")
    return float(value)


def model_type(model: Mapping[str, Any], exists: Callable[[str], bool] | None = None) -> str | None:
    """The kind of a declared model read from its config.json (a local diffusers folder, or the
    config folder of a single file); None when it cannot be told here (a hub id, s3://)."""
    folder = model.get("config") or model["path"]
    config = Path(folder) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return CONTROLNET if str(model["path"]).endswith((".safetensors", ".ckpt", ".pth")) else None
    kind = MODEL_CLASSES.get(data.get("_class_name", "") if isinstance(data, dict) else "")
    if kind is None:
        raise ControlProblem(f"{config} names a {data.get('_class_name')!r}, not a ControlNetModel or T2IAdapter")
    return kind


def check_control(
    item: Any,
    models: Mapping[str, Mapping[str, Any]],
    resolve_image: Callable[[str], tuple[str, bool]],
    kinds: dict[str, str | None],
) -> dict[str, Any]:
    """One entry in canonical form. `models`: the profile's declared models by name;
    `resolve_image`: the image reference as (URL, upload?); `kinds`: model types found so far."""
    if not isinstance(item, Mapping):
        raise ControlProblem(f"each entry must be an object with name and image (got {type(item).__name__})")
    unknown = set(item) - _KEYS
    if unknown:
        raise ControlProblem(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; use {', '.join(sorted(_KEYS))}")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ControlProblem(f"name must be an identifier of letters, digits and _ (got {name!r})")
    if name not in models:
        declared = ", ".join(sorted(models)) or "none"
        raise ControlProblem(f"{name}: no control model of that name in the profile (declared: {declared})")
    model = models[name]
    if name not in kinds:
        kinds[name] = model_type(model)
    kind = item.get("type")
    if kind is not None and kind not in TYPES:
        raise ControlProblem(f"{name}: type must be one of {', '.join(TYPES)} (got {kind!r})")
    if kind is not None and kinds[name] is not None and kind != kinds[name]:
        raise ControlProblem(f"{name}: type {kind!r} given, but the model {model['path']} is a {kinds[name]}")
    kind = kinds[name] or kind or CONTROLNET
    image = item.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ControlProblem(f"{name}: image must be a non-empty string (an s3:// URL or a file name)")
    url, upload = resolve_image(image)
    preprocess = item.get("preprocess", "none") or "none"
    if preprocess not in PREPROCESS:
        extra = " (a depth or pose map must be given as the image: no model runs to make one)"
        raise ControlProblem(f"{name}: preprocess must be one of {', '.join(PREPROCESS)} (got {preprocess!r}){extra}")
    entry: dict[str, Any] = {
        "name": name,
        "type": kind,
        "model": model["path"],
        "image": url,
        "scale": _number(item, "scale", DEFAULT_SCALE[kind], 0.0, MAX_SCALE, name),
        "preprocess": preprocess,
        "start": _number(item, "start", 0.0, 0.0, 1.0, name),
        "end": _number(item, "end", 1.0, 0.0, 1.0, name),
    }
    if model.get("config"):
        entry["config"] = model["config"]
    if entry["start"] >= entry["end"]:
        raise ControlProblem(f"{name}: start ({entry['start']:g}) must be below end ({entry['end']:g})")
    if kind == T2I_ADAPTER and (entry["start"], entry["end"]) != (0.0, 1.0):
        raise ControlProblem(f"{name}: start and end apply to ControlNets only (a T2I-Adapter acts on every step)")
    if preprocess == "canny":
        entry["low"] = _number(item, "low", CANNY_LOW, 0.0, 1020.0, name)
        entry["high"] = _number(item, "high", CANNY_HIGH, 0.0, 1020.0, name)
        if entry["low"] > entry["high"]:
            raise ControlProblem(f"{name}: low ({entry['low']:g}) must not be above high ({entry['high']:g})")
    elif "low" in item or "high" in item:
        raise ControlProblem(f"{name}: low and high are canny's thresholds; set preprocess to canny")
    if upload:
        entry["upload"] = True  # the producer stores the file and replaces the URL (scheduler.inputs)
    return entry


def check_controls(
    value: Any,
    models: Mapping[str, Mapping[str, Any]],
    resolve_image: Callable[[str], tuple[str, bool]],
    from_text: bool = False,
    kinds: dict[str, str | None] | None = None,
    img2img: bool = False,
) -> tuple[dict[str, Any], ...]:
    """A whole set: a list of entries (JSON text in a CSV cell), no name twice, one kind per job
    (a pipeline call runs ControlNets or T2I-Adapters, not both). Sorted by name."""
    if from_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ControlProblem('must be a JSON list like [{"name": "canny", "image": "edges/1.png"}]') from None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ControlProblem(f"must be a list of {{name, image, ...}} objects (got {type(value).__name__})")
    if len(value) > MAX_CONTROLS:
        raise ControlProblem(f"at most {MAX_CONTROLS} controls per job (got {len(value)})")
    kinds = {} if kinds is None else kinds
    checked = [check_control(item, models, resolve_image, kinds) for item in value]
    seen: set[str] = set()
    for entry in checked:
        if entry["name"] in seen:
            raise ControlProblem(f"name {entry['name']!r} given twice")
        seen.add(entry["name"])
    if len({entry["type"] for entry in checked}) > 1:
        raise ControlProblem("ControlNets and T2I-Adapters cannot be mixed in one job")
    if img2img and checked and checked[0]["type"] == T2I_ADAPTER:
        raise ControlProblem("T2I-Adapters do not run with img2img (init_image); use a ControlNet")
    return tuple(sorted(checked, key=lambda e: e["name"]))


def parse_control_flag(text: str) -> dict[str, Any]:
    """`NAME=IMAGE[:SCALE]` from the command line; the scale is the text after the last ':' when
    it reads as a number, so s3://bucket/key stays whole."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ControlProblem(f"expected NAME=IMAGE[:SCALE] (got {text!r})")
    entry: dict[str, Any] = {"name": name.strip(), "image": rest.strip()}
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            entry["scale"] = float(tail)
            entry["image"] = head.strip()
        except ValueError:
            pass
    return entry


def control_key(controls: Sequence[Mapping[str, Any]] | None) -> str:
    """The set as the render shape holds it ("" for none): models, scales, start/end, no images."""
    if not controls:
        return ""
    rows = [[e.get(f) for f in SHAPE_FIELDS] for e in sorted(controls, key=lambda e: e["name"])]
    return json.dumps(rows, separators=(",", ":"))


def with_scale(controls: Sequence[Mapping[str, Any]], target: str | None, scale: float) -> tuple[dict[str, Any], ...]:
    """The set with one control's scale (`control_scale.NAME`) or every control's replaced."""
    if not 0.0 <= scale <= MAX_SCALE:
        raise ControlProblem(f"must be between 0 and {MAX_SCALE:g} (got {scale:g})")
    names = [entry["name"] for entry in controls]
    if target is not None and target not in names:
        raise ControlProblem(f"the row has no control named {target!r} (has: {', '.join(names) or 'none'})")
    return tuple(dict(e) | {"scale": scale} if target in (None, e["name"]) else dict(e) for e in controls)


def describe(controls: Sequence[Mapping[str, Any]] | None) -> str | None:
    """The A1111 parameters text's part: `ControlNet 0: "Module: canny, Model: canny, Weight:
    0.8, Guidance Start: 0, Guidance End: 1"`, one per control."""
    if not controls:
        return None
    parts = []
    for i, e in enumerate(controls):
        label = "ControlNet" if e["type"] == CONTROLNET else "T2I-Adapter"
        module = e["preprocess"] if e["preprocess"] != "none" else "none"
        fields = f"Module: {module}, Model: {e['name']}, Weight: {e['scale']:g}"
        if e["type"] == CONTROLNET:
            fields += f", Guidance Start: {e['start']:g}, Guidance End: {e['end']:g}"
        if e["preprocess"] == "canny":
            fields += f", Threshold A: {e['low']:g}, Threshold B: {e['high']:g}"
        parts.append(f'{label} {i}: "{fields}"')
    return ", ".join(parts)
