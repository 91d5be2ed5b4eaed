"""Image output formats of a batch: which encoder, which extension, which Content-Type.

The contract side of encoding: the producer validates `--format`/`--quality` with it before
anything is written, the worker picks extension and Content-Type from it, and the manifest
and exports name it. The encoders themselves live in worker/encode.py (Pillow, worker side).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lcmq.errors import InputError

MIN_QUALITY, MAX_QUALITY = 1, 100


@dataclass(frozen=True)
class ImageFormat:
    name: str  # as submitted: png, webp, jpeg
    ext: str  # of the object key and the exported files
    content_type: str
    default_quality: int | None  # None: lossless, `quality` does not apply


FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", "png", "image/png", None),
    "webp": ImageFormat("webp", "webp", "image/webp", 90),
    # .jpg: the extension dataset tools (webdataset's decoders, imagefolder) know best.
    "jpeg": ImageFormat("jpeg", "jpg", "image/jpeg", 90),
}
ALIASES = {"jpg": "jpeg"}
DEFAULT_FORMAT = "png"


@dataclass(frozen=True)
class OutputFormat:
    """A batch's resolved output: the format and, for lossy ones, the quality in use."""

    format: ImageFormat
    quality: int | None

    @property
    def name(self) -> str:
        return self.format.name

    @property
    def ext(self) -> str:
        return self.format.ext

    @property
    def content_type(self) -> str:
        return self.format.content_type

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> OutputFormat:
        """The output a batch's stored options name; batches from before formats were PNG."""
        image_format = FORMATS[options.get("image_format") or DEFAULT_FORMAT]
        return cls(image_format, options.get("quality"))


def check_output(source: str, image_format: Any, quality: Any) -> tuple[str, int | None]:
    """Validate `--format`/`--quality` (named as the flags); returns (format, quality) with the
    quality resolved, so `--format webp` and `--format webp --quality 90` are one batch."""
    name = ALIASES.get(image_format, image_format) if isinstance(image_format, str) else image_format
    if name not in FORMATS:
        raise InputError(source, None, "--format", f"must be one of {', '.join(FORMATS)} (got {image_format!r})")
    chosen = FORMATS[name]
    if quality is None:
        return name, chosen.default_quality
    if chosen.default_quality is None:
        raise InputError(source, None, "--quality", f"applies to webp and jpeg only ({name} is lossless)")
    if not isinstance(quality, int) or isinstance(quality, bool) or not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise InputError(
            source, None, "--quality", f"must be an integer between {MIN_QUALITY} and {MAX_QUALITY} (got {quality!r})"
        )
    return name, quality
