"""Job specs: the one parser and the one validator that the CLI and the Python API share.

A batch file is `.txt` (one prompt per line), `.jsonl` (objects with `prompt` and optional
fields) or `.csv` (a header row with a `prompt` column). Rows are read as a stream; every row is
validated before anything is committed or enqueued, and an error names file, line and field.
"""

from __future__ import annotations

import csv
import json
import math
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmq.controls import ControlProblem, check_controls, control_key
from lcmq.errors import InputError, PermanentError
from lcmq.loras import LoraProblem, check_loras, lora_key
from lcmq.profiles import Profile
from lcmq.settings import get_settings
from lcmq.storage import file_sha256

MIN_STEPS, MAX_STEPS = 1, 8
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 2.0
MAX_SIDE = 2048  # a job's width and height, and an init image's sides (worker.img2img)
SIZE_MULTIPLE = 8
MAX_SEED = 2**63 - 1
SEED_BITS = 32  # a seed derived from a batch's seed and a row, or from a catalog item's id
MAX_NAME = 200  # batches.name is a String(200)
# Fields a row may set; every other key (or CSV column) is kept as the job's metadata.
JOB_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "loras",
    "init_image",
    "strength",
    "control",
)
PROMPT_FIELDS = ("prompt", "negative_prompt")  # at most `max_prompt_chars` (LCMQ_MAX_PROMPT_CHARS) each
DEFAULT_STRENGTH = 0.5  # img2img without a strength: half the steps, the usual LCM img2img setting
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class JobSpec:
    index: int
    prompt: str
    negative_prompt: str
    seed: int | None  # None: derived from the batch seed and the index when the batch is built
    steps: int
    guidance: float
    width: int
    height: int
    metadata: dict[str, Any] = field(default_factory=dict)
    # The input row a job came from, when it differs from its index (a matrix makes several
    # jobs of one row): a derived seed comes from the row, so a row's cells share it.
    row: int | None = None
    # Style LoRAs, canonical (lcmq.loras): sorted by name, local paths absolute.
    loras: tuple[dict[str, Any], ...] = ()
    # img2img: an s3:// or file:// URL, and how much of the image the steps may change. A
    # relative file name is resolved at submit to a file:// URL with upload_init set: the
    # producer uploads it under the batch's prefix and stores that URL instead.
    init_image: str | None = None
    strength: float | None = None
    upload_init: bool = False
    # ControlNets / T2I-Adapters, canonical (lcmq.controls): sorted by name, each with its model
    # and image URL; an entry with "upload" names a local file the producer stores first.
    control: tuple[dict[str, Any], ...] = ()

    @property
    def render_shape(self) -> tuple:
        """Jobs with the same shape can share one pipeline call."""
        return render_shape(self.width, self.height, self.steps, self.guidance, self.loras, self.strength, self.control)


def render_shape(
    width: int,
    height: int,
    steps: int,
    guidance: float,
    loras: Any = None,
    strength: float | None = None,
    control: Any = None,
) -> tuple:
    """What one pipeline call needs its jobs to share: size, steps, guidance, the style LoRA set
    (one adapter set is active per call), for img2img the strength (None: text2img) and the
    control set without its images (models, scales, start/end: one pipeline per call; each job
    brings its own control images). The producer chunks by it and the worker groups
    micro-batches by it: both sides call this."""
    return (width, height, steps, guidance, lora_key(loras), strength, control_key(control))


@dataclass(frozen=True)
class BatchOptions:
    """Batch-wide defaults from flags or API keywords; a row's own fields override them."""

    model: str
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    name: str | None = None
    # How the images are encoded (lcmq.formats); quality is resolved at submit for lossy ones.
    image_format: str = "png"
    quality: int | None = None
    # Axes that multiply every row (lcmq.matrix): ((name, (values...)), ...), in the given order.
    matrix: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    # Style LoRAs of every row that sets none (`--lora`); None: the profile's (lcmq.loras).
    loras: tuple[dict[str, Any], ...] | None = None
    # Controls of every row that sets none (`--control`): raw entries, checked by the validator.
    controls: tuple[dict[str, Any], ...] | None = None


# --- field checks -------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any, limit: int = 40) -> str:
    """A value as an error message quotes it: ints exact, floats short, long text cut."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif _is_int(value):
        try:
            text = str(value)
        except ValueError:  # more digits than int->str allows
            text = "a very large integer"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce_int(value: Any, fail, from_text: bool) -> int:
    if from_text and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            fail(f"must be an integer (got {_show(value)})")
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)
    if not _is_int(value):
        fail(f"must be an integer (got {_show(value)})")
    return value


def _coerce_float(value: Any, fail, from_text: bool) -> float:
    if from_text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            fail(f"must be a number (got {_show(value)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"must be a number (got {_show(value)})")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        fail(f"is too large (got {_show(value)})")
    if not math.isfinite(value):
        fail(f"must be a finite number (got {value!r})")
    return value


def _bad_char(value: str, controls: bool) -> str | None:
    """Why a string cannot be stored: a control character (C0, DEL, C1; tab and newlines are
    fine) or a lone surrogate (JSON's \\ud800 escapes; not encodable as UTF-8)."""
    if value.isprintable():  # the common case, in C: no control characters, no surrogates
        return None
    for c in value:
        if c.isprintable() or c in "\t\n\r":
            continue
        category = unicodedata.category(c)
        if category == "Cs":
            return f"contains an unpaired surrogate (U+{ord(c):04X})"
        if controls and category == "Cc":
            return f"contains a control character (U+{ord(c):04X})"
    return None


def _check_text(value: Any, fail, *, required: bool) -> str:
    if not isinstance(value, str):
        fail(f"must be a string (got {type(value).__name__})")
    bad = _bad_char(value, controls=True)
    if bad is not None:
        fail(bad)
    if required and not value.strip():
        fail("must not be empty")
    return value


def _check_range(value, low, high, what: str, fail):
    if not low <= value <= high:
        fail(f"must be between {_show(low)} and {_show(high)} (got {_show(value)}){what}")
    return value


def _check_side(value: int, fail) -> int:
    if value <= 0 or value > MAX_SIDE:
        fail(f"must be between {SIZE_MULTIPLE} and {MAX_SIDE} (got {_show(value)})")
    if value % SIZE_MULTIPLE:
        fail(f"must be a multiple of {SIZE_MULTIPLE} (got {value})")
    return value


def _check_metadata(value: Any, fail, depth: int = 0) -> None:
    """Metadata is stored as JSON: only JSON data, finite numbers, UTF-8-encodable text."""
    if depth > 32:
        fail("is nested too deeply")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            fail(f"must be a finite number (got {value!r})")
    elif isinstance(value, str):
        bad = _bad_char(value, controls=False)
        if bad is not None:
            fail(bad)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_metadata(item, fail, depth + 1)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                fail(f"keys must be strings (got {type(key).__name__})")
            _check_metadata(key, fail, depth + 1)
            _check_metadata(item, fail, depth + 1)
    else:
        fail(f"must be JSON data (got {type(value).__name__})")


class FieldProblem(PermanentError):
    """A field check failed; the caller names the field and line (no closure per field and row:
    validation runs 10^5 times a second)."""


def _fail(message: str):
    raise FieldProblem(message)


def _check_required_text(value: Any, from_text: bool) -> str:
    return _check_text(value, _fail, required=True)


def _check_optional_text(value: Any, from_text: bool) -> str:
    return _check_text(value, _fail, required=False)


def _check_seed(value: Any, from_text: bool) -> int:
    return _check_range(_coerce_int(value, _fail, from_text), 0, MAX_SEED, "", _fail)


def _check_steps(value: Any, from_text: bool) -> int:
    return _check_range(_coerce_int(value, _fail, from_text), MIN_STEPS, MAX_STEPS, "", _fail)


def _check_guidance(value: Any, from_text: bool) -> float:
    return _check_range(
        _coerce_float(value, _fail, from_text),
        MIN_GUIDANCE,
        MAX_GUIDANCE,
        "; 1.0 disables CFG, above 2 breaks LCM images",
        _fail,
    )


def _check_size(value: Any, from_text: bool) -> int:
    return _check_side(_coerce_int(value, _fail, from_text), _fail)


def _check_strength_field(value: Any, from_text: bool) -> float:
    return _check_strength(_coerce_float(value, _fail, from_text))


_FIELD_CHECKS = {
    "prompt": _check_required_text,
    "negative_prompt": _check_optional_text,
    "seed": _check_seed,
    "steps": _check_steps,
    "guidance": _check_guidance,
    "width": _check_size,
    "height": _check_size,
    "strength": _check_strength_field,
    "init_image": _check_required_text,  # then resolved by the validator (relative names, schemes)
}


def check_field(name: str, value: Any, from_text: bool = False) -> Any:
    """One job field's value, checked (and coerced from text when `from_text`: CSV cells, the
    command line); raises FieldProblem. The matrix checks its axis values with it."""
    return _FIELD_CHECKS[name](value, from_text)


def parse_number(value: Any, from_text: bool = True) -> float:
    """A finite number (from text when `from_text`); raises FieldProblem."""
    return _coerce_float(value, _fail, from_text)


def _check_strength(value: float) -> float:
    if not 0 < value <= 1:
        _fail(f"must be above 0 and at most 1 (got {_show(value)}); 1 ignores the init image")
    return value


def resolve_init_image(ref: str, base_dir: Path | None, exists=None) -> tuple[str, bool]:
    """(URL, upload?) of an init image: s3:// as is; file:///abs must exist; a plain name is a file
    relative to base_dir (the batch file's folder, else the working directory) that must exist
    and is uploaded under the batch's prefix, so workers on other machines can read it."""
    import os
    from urllib.parse import urlparse

    exists = exists or os.path.isfile
    ref = ref.strip()
    if ref.startswith("s3://"):
        parsed = urlparse(ref)
        if not parsed.netloc or not parsed.path.strip("/"):
            _fail(f"must be s3://bucket/key (got {_show(ref)})")
        return ref, False
    if ref.startswith("file://"):
        path = Path(ref[len("file://") :])
        if not path.is_absolute():
            _fail(f"a file:// URL must hold an absolute path (got {_show(ref)}); or give a plain file name")
        if not exists(str(path)):
            _fail(f"no such file {path}")
        return _file_url(path), False
    if "://" in ref:
        _fail(f"must be an s3:// or file:// URL, or a file name (got {_show(ref)})")
    # os.path, not Path: Path.expanduser raises for an unknown ~user, and the URL needs an
    # absolute path even when the batch file was named relative to the working directory.
    path = Path(os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(ref))))
    if not exists(str(path)):
        _fail(f"no such file {path}")
    return _file_url(path), True


def _file_url(path: Path) -> str:
    """file:// and the path as it is, not percent-encoded as Path.as_uri does: the uploader and
    lcmq.storage.read_url take what follows file:// as the path (`my photo.png` stays readable)."""
    return f"file://{path}"


_JOB_FIELD_SET = frozenset(JOB_FIELDS)


# --- keys that look like a misspelt field ---------------------------------------------------


def _typed_name(key: str) -> str:
    """A key as it is compared with the field names: case, `-` and spaces do not matter."""
    return key.strip().lower().replace("-", "_").replace(" ", "_")


def _at_most_one_edit(typed: str, name: str) -> bool:
    """Whether one insertion, deletion, substitution or swap of neighbours (Damerau-Levenshtein
    distance 1) or none turns one name into the other."""
    short, long = sorted((typed, name), key=len)
    if len(long) - len(short) > 1:
        return False
    same = 0  # the common prefix; the one edit is where it ends
    while same < len(short) and short[same] == long[same]:
        same += 1
    if len(short) < len(long):
        return short[same:] == long[same + 1 :]
    swapped = short[same : same + 2] == long[same : same + 2][::-1] and short[same + 2 :] == long[same + 2 :]
    return short[same + 1 :] == long[same + 1 :] or swapped


def near_field(key: Any) -> str | None:
    """The job field a key that is not one was probably meant to be: the same name in another
    case or with `-` (`Prompt`, `negative-prompt`), or one edit away (`stepz`, `seeds`)."""
    if not isinstance(key, str) or key in _JOB_FIELD_SET:
        return None
    typed = _typed_name(key)
    for name in JOB_FIELDS:
        if _at_most_one_edit(typed, name) or typed.replace("_", "") == name.replace("_", ""):
            return name
    return None


def check_keys(keys: Iterable[Any], source: str, line: int | None, what: str = "key") -> None:
    """Refuse a key (a JSONL key, a CSV column) that looks like a misspelt job field: kept as
    metadata, it would leave the field at its default without a word. Other keys are metadata."""
    for key in keys:
        meant = near_field(key)
        if meant is not None:
            why = f"a {what} this close to a field is refused, not kept as metadata"
            raise InputError(source, line, key, f"is not a job field; did you mean {meant!r}? ({why})")


class RowValidator:
    """Turns raw rows into JobSpecs, filling defaults from the batch options and the profile."""

    def __init__(
        self,
        options: BatchOptions,
        profile: Profile,
        source: str,
        base_dir: Path | None = None,
        max_prompt_chars: int | None = None,
        local_files: bool = True,
    ):
        import os

        self.source = source
        # False for HTTP callers: the rows may name s3:// objects only, never a file of the
        # machine that validates them (the API process's own disk is not theirs to read or probe).
        self.local_files = local_files
        self.profile = profile
        # Relative LoRA paths and init images name files next to the batch file: made absolute
        # now (`lcmq submit rows.jsonl` gives "."), so what is stored is the same from any folder.
        self.base_dir = Path(os.path.abspath(base_dir)) if base_dir is not None else None
        if max_prompt_chars is None:
            max_prompt_chars = get_settings().max_prompt_chars
        self.max_prompt_chars = max_prompt_chars
        self._exists: dict[str, bool] = {}  # a path shared by 10^5 rows is looked up once
        self._is_file: dict[str, bool] = {}
        # Batch defaults are validated once, up front, so a bad flag is named as a flag.
        flags = {
            k: v
            for k, v in {
                "steps": options.steps,
                "guidance": options.guidance,
                "width": options.width,
                "height": options.height,
                "seed": options.seed,
                "negative_prompt": options.negative_prompt,
            }.items()
            if v is not None
        }
        checked = self._check_fields(flags, "--", line=None, from_text=False)
        if options.name is not None:
            self._check_name(options.name)
        try:  # batch LoRAs (--lora) replace the profile's, as any flag replaces a profile default
            loras = check_loras(
                options.loras if options.loras is not None else profile.loras,
                None,
                exists=self._given_path_exists if options.loras is not None else self._path_exists,
            )
        except LoraProblem as exc:
            where = "--lora" if options.loras is not None else f"profile {profile.name}: loras"
            raise InputError(self.source, None, where, str(exc)) from None
        self._kinds: dict[str, str | None] = {}  # control model name -> type, read once per batch
        try:  # --control: images relative to the working directory, as --lora paths
            controls = self._controls(options.controls or (), None, from_text=False, base_dir=None)
        except ControlProblem as exc:
            raise InputError(self.source, None, "--control", str(exc)) from None
        for flag, field_name in (("--lora", "loras"), ("--control", "control")):
            if problem := self._runtime_problem(field_name, {"loras": loras, "control": controls}):
                raise InputError(self.source, None, flag, problem)
        self.defaults = {
            "control": controls,
            "loras": loras,
            "negative_prompt": checked.get("negative_prompt", ""),
            "steps": checked.get("steps", profile.steps),
            "guidance": checked.get("guidance", profile.guidance),
            "width": checked.get("width", profile.width),
            "height": checked.get("height", profile.height),
        }

    def _check_name(self, name: Any) -> None:
        def fail(message: str):
            raise InputError(self.source, None, "--name", message)

        _check_text(name, fail, required=False)
        if len(name) > MAX_NAME:
            fail(f"must be at most {MAX_NAME} characters (got {len(name)})")

    def _check_fields(self, raw: Mapping[str, Any], prefix: str, line: int | None, from_text: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in JOB_FIELDS:
            value = raw.get(name)
            if value is None or (from_text and value == "" and name != "prompt") or name not in _FIELD_CHECKS:
                continue
            try:
                out[name] = _FIELD_CHECKS[name](value, from_text)
                if name in PROMPT_FIELDS and len(value) > self.max_prompt_chars:
                    _fail(f"is {len(value)} characters long; at most {self.max_prompt_chars} (LCMQ_MAX_PROMPT_CHARS)")
            except FieldProblem as exc:
                # A batch default is named as the CLI flag that sets it (--negative-prompt).
                where = prefix + name.replace("_", "-") if prefix else name
                raise InputError(self.source, line, where, str(exc)) from None
        return out

    def validate(self, index: int, line: int, raw: Mapping[str, Any], from_text: bool = False) -> JobSpec:
        if "prompt" not in raw:
            raise InputError(self.source, line, "prompt", "missing")
        if raw["prompt"] is None:  # _check_fields skips None (unset) fields; a prompt is required
            raise InputError(self.source, line, "prompt", "must be a string (got null)")
        checked = self._check_fields(raw, "", line, from_text)
        values = self.defaults | checked
        self._check_inputs(raw, values, line, from_text)
        metadata = {k: v for k, v in raw.items() if k not in _JOB_FIELD_SET}
        for key, value in metadata.items():
            try:
                if not isinstance(key, str):
                    _fail(f"keys must be strings (got {type(key).__name__})")
                _check_metadata(key, _fail)
                _check_metadata(value, _fail)
            except FieldProblem as exc:
                raise InputError(self.source, line, str(key), str(exc)) from None
        return JobSpec(
            index=index,
            prompt=values["prompt"],
            negative_prompt=values["negative_prompt"],
            seed=values.get("seed"),
            steps=values["steps"],
            guidance=values["guidance"],
            width=values["width"],
            height=values["height"],
            metadata=metadata,
            loras=values["loras"],
            control=values["control"],
            init_image=values.get("init_image"),
            strength=values.get("strength"),
            upload_init=values.get("upload_init", False),
        )

    def _path_exists(self, path: str) -> bool:
        import os

        if path not in self._exists:
            self._exists[path] = os.path.exists(path)
        return self._exists[path]

    def _given_path_exists(self, path: str) -> bool:
        """A LoRA path the submitter gave (a profile's own, set by the operator, is always local)."""
        if not self.local_files:
            raise LoraProblem(f"path {path!r}: over the HTTP API a LoRA must be an s3:// URL")
        return self._path_exists(path)

    def _given_file_exists(self, path: str) -> bool:
        if not self.local_files:
            raise FieldProblem(f"over the HTTP API an init image must be an s3:// URL (got a file name: {path!r})")
        return self._file_exists(path)

    def _file_exists(self, path: str) -> bool:
        """An init image must be a file: a folder would pass `exists` and fail its upload."""
        import os

        if path not in self._is_file:
            self._is_file[path] = os.path.isfile(path)
        return self._is_file[path]

    def _controls(
        self, value: Any, init_image: str | None, from_text: bool, base_dir: Path | None
    ) -> tuple[dict[str, Any], ...]:
        def exists(path: str) -> bool:
            if not self.local_files:
                raise FieldProblem("over the HTTP API a control image must be an s3:// URL (got a file name)")
            return self._file_exists(path)

        def resolve(ref: str) -> tuple[str, bool]:
            try:
                return resolve_init_image(ref, base_dir, exists=exists)
            except FieldProblem as exc:
                raise ControlProblem(f"image {ref!r}: {exc}") from None

        return check_controls(
            value,
            self.profile.control_models,
            resolve,
            from_text=from_text,
            kinds=self._kinds,
            img2img=init_image is not None,
        )

    def _check_inputs(self, raw: Mapping[str, Any], values: dict[str, Any], line: int, from_text: bool) -> None:
        """The row's style LoRAs and img2img fields, which depend on the batch file's folder and
        on each other: a strength needs an init image, and must leave the steps at least one."""

        def fail(name: str, message: str):
            raise InputError(self.source, line, name, message)

        value = raw.get("loras")
        if value is not None and not (from_text and value == ""):
            try:  # the row's set replaces the batch's ([] renders without style LoRAs)
                values["loras"] = check_loras(value, self.base_dir, from_text, exists=self._given_path_exists)
            except LoraProblem as exc:
                fail("loras", str(exc))
        if "init_image" in values:
            try:
                values["init_image"], values["upload_init"] = resolve_init_image(
                    values["init_image"], self.base_dir, exists=self._given_file_exists
                )
            except FieldProblem as exc:
                fail("init_image", str(exc))
            values.setdefault("strength", DEFAULT_STRENGTH)
            # The img2img pipeline runs int(steps * strength) of the steps: at least one.
            if int(values["steps"] * values["strength"]) < 1:
                fail(
                    "strength",
                    f"{values['strength']:g} of {values['steps']} steps leaves no step to run; "
                    f"use at least {1 / values['steps']:g} or more steps",
                )
        elif "strength" in values:
            fail("strength", "needs an init_image (strength is for img2img)")
        value = raw.get("control")
        try:
            if value is not None and not (from_text and value == ""):  # the row's set replaces the batch's
                values["control"] = self._controls(value, values.get("init_image"), from_text, self.base_dir)
            elif values["control"] and values.get("init_image"):  # --control on an img2img row
                if values["control"][0]["type"] != "controlnet":
                    raise ControlProblem("T2I-Adapters do not run with img2img (init_image); use a ControlNet")
        except ControlProblem as exc:
            fail("control", str(exc))
        for name in ("init_image", "control", "loras"):
            if problem := self._runtime_problem(name, values):
                fail(name, problem)

    def _runtime_problem(self, name: str, values: Mapping[str, Any]) -> str | None:
        """What the profile's OpenVINO export cannot render, refused at submit rather than failed
        in the worker: img2img, controls, and style LoRAs other than the ones fused into it."""
        profile = self.profile
        if profile.runtime == "torch":
            return None
        runs = f"profile {profile.name} runs on {profile.runtime}, which"
        if name == "init_image" and values.get("init_image"):
            return f"{runs} renders text-to-image only (no img2img); use a torch profile"
        if name == "control" and values.get("control"):
            return f"{runs} cannot run ControlNets or T2I-Adapters; use a torch profile"
        if name == "loras" and lora_key(values.get("loras")) != lora_key(profile.loras):
            return f"{runs} renders the profile's own style LoRAs only (fused into its export); use a torch profile"
        return None


# --- readers: (line number, raw row) streams --------------------------------------------


def _open_input(path: Path, source: str):
    """The batch file for reading; an unreadable one is an input error, not a traceback."""
    try:
        return path.open("rb")
    except OSError as exc:
        raise InputError(source, None, None, f"cannot read the file: {exc.strerror or exc}") from None


def _decoded_lines(path: Path, source: str) -> Iterator[tuple[int, str]]:
    with _open_input(path, source) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(source, number, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text


def _read_txt(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in _decoded_lines(path, source):
        prompt = text.rstrip("\r\n")
        if prompt.strip():
            yield number, {"prompt": prompt}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


# One decoder for every line: json.loads with an argument builds a new decoder per call.
_JSON_ROW = json.JSONDecoder(parse_constant=_reject_constant)


def read_jsonl_rows(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    decode = _JSON_ROW.decode
    for number, text in _decoded_lines(path, source):
        if not text.strip():
            continue
        try:
            row = decode(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:  # its own "line 1" would only confuse: say the column
            raise InputError(source, number, None, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
        except ValueError as exc:  # NaN/Infinity, or an integer with too many digits
            raise InputError(source, number, None, f"malformed JSON: {exc}") from None
        except RecursionError:
            raise InputError(source, number, None, "malformed JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise InputError(source, number, None, f"each line must be a JSON object (got {type(row).__name__})")
        yield number, row


def _missing_column(required: str, names: list[str]) -> str:
    """Why a header lacks the required column, when the file says why: another case, or a
    delimiter other than the comma (the whole header is then one column)."""
    message = f"header has no {required!r} column"
    for delimiter, called in ((";", "semicolon"), ("\t", "tab")):
        if len(names) == 1 and delimiter in names[0]:
            return f"{message}: the file looks {called}-separated; lcmq reads comma-separated CSV"
    meant = next((name for name in names if _typed_name(name) == required), None)
    if meant is not None:
        return f"{message}, but a {meant!r} one: column names are case-sensitive"
    return message


def read_csv_rows(
    path: Path, source: str, required: str = "prompt", job_columns: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV file named by its header. With `job_columns` (a batch file, not a catalog)
    a column that looks like a misspelt job field is refused at the header."""
    lines = _decoded_lines(path, source)
    # csv.reader consumes the line stream; its line_num tells where a (multi-line) record ended.
    reader = csv.reader((text for _, text in lines), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        seen: set[str] = set()
        for name in names:
            if not name:
                raise InputError(source, 1, None, "empty column name in header")
            if name in seen:
                raise InputError(source, 1, name, "duplicate column in header")
            seen.add(name)
        if required not in seen:  # "prompt"; a catalog's rows are named by their "id" instead
            raise InputError(source, 1, required, _missing_column(required, names))
        if job_columns:
            check_keys(names, source, 1, "column")
        for record in reader:
            if not record or all(not cell.strip() for cell in record):
                continue
            if len(record) != len(names):
                raise InputError(source, reader.line_num, None, f"expected {len(names)} fields, got {len(record)}")
            yield reader.line_num, dict(zip(names, record, strict=False))
    except csv.Error as exc:
        raise InputError(source, reader.line_num, None, f"malformed CSV: {exc}") from None


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Raw rows of a batch file with their line numbers, streamed."""
    source = str(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(source, None, None, f"unknown file type {path.suffix!r}; use .txt, .jsonl or .csv")
    if not path.is_file():
        raise InputError(source, None, None, "no such file")
    if fmt == "csv":
        return read_csv_rows(path, source, job_columns=True)
    return {"txt": _read_txt, "jsonl": read_jsonl_rows}[fmt](path, source)


def rows_from_objects(
    rows: Iterable[str | Mapping[str, Any]], source: str = "<rows>"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows given in Python (API): strings are prompts, mappings are JSONL-like objects."""
    for number, row in enumerate(rows, start=1):
        if isinstance(row, str):
            yield number, {"prompt": row}
        elif isinstance(row, Mapping):
            yield number, dict(row)
        else:
            raise InputError(source, number, None, f"a row must be a string or a mapping (got {type(row).__name__})")


def iter_specs(
    rows: Iterable[tuple[int, dict[str, Any]]], validator: RowValidator, from_text: bool = False
) -> Iterator[JobSpec]:
    """Validated specs as a stream; raises on the first bad row, or on the first key that looks
    like a misspelt job field (each distinct key is checked once, not once a row)."""
    checked_keys: set[Any] = set()
    for index, (line, raw) in enumerate(rows):
        if not checked_keys.issuperset(raw):
            check_keys([key for key in raw if key not in checked_keys], validator.source, line)
            checked_keys.update(raw)
        yield validator.validate(index, line, raw, from_text)


def validate_rows(
    rows: Iterable[tuple[int, dict[str, Any]]], validator: RowValidator, from_text: bool = False
) -> list[JobSpec]:
    """Validate every row; raises on the first bad one, before anything is written."""
    specs = list(iter_specs(rows, validator, from_text))
    if not specs:
        raise InputError(validator.source, None, None, "no prompts in input")
    return specs


def open_batch_file(path: Path, validator: RowValidator) -> tuple[Iterator[JobSpec], str]:
    """A batch file's validated specs as one stream, and the sha256 of its bytes.

    The stream raises InputError at the first bad row, and at its end when the file held no
    prompt. Validation happens as the rows are written: the caller consumes the stream inside
    the transaction that writes them, so a bad row anywhere rolls every row back (nothing is
    written), and the file is read once while the database ingests rows in parallel.
    """
    rows = read_rows(path)  # a missing file or unknown type is refused before anything else
    try:
        content_sha256 = file_sha256(path)
    except OSError as exc:  # unreadable (permissions): the user's to fix, like a missing file
        raise InputError(validator.source, None, None, f"cannot read the file: {exc.strerror or exc}") from None

    def specs() -> Iterator[JobSpec]:
        count = 0
        for spec in iter_specs(rows, validator, is_text_format(path)):
            count += 1
            yield spec
        if not count:
            raise InputError(validator.source, None, None, "no prompts in input")

    return specs(), content_sha256


def is_text_format(path: Path) -> bool:
    """CSV cells are text: numbers in them are parsed, where JSON must give real numbers."""
    return path.suffix.lower() == ".csv"
