"""Image encoding with the job's parameters embedded, byte-for-byte reproducible.

- PNG: an iTXt `parameters` chunk (UTF-8).
- JPEG and WebP: the same text in EXIF UserComment (tag 0x9286 of the Exif IFD), as
  `UNICODE\\0` + UTF-16 in the EXIF's own byte order (big-endian). That is where A1111-style
  readers (and exiftool's UserComment) look for the parameters of a JPEG or WebP.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from lcmq.controls import describe
from lcmq.formats import OutputFormat

# zlib level 4 costs ~half the time of the default 6 for a few percent more bytes.
PNG_COMPRESS_LEVEL = 4
# libwebp's default effort, pinned: the bytes must not change with a library default.
WEBP_METHOD = 4
USER_COMMENT_UNICODE = b"UNICODE\x00"
JPEG_EXIF_LIMIT = 65533  # bytes in one JPEG marker segment (Pillow's MAX_BYTES_IN_MARKER)


class Encoded(NamedTuple):
    data: bytes
    content_type: str
    ext: str


def parameters_text(job: Any, profile: str) -> str:
    """The `parameters` text, in the layout image tools (A1111, ComfyUI readers) understand."""
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    settings = (
        f"Steps: {job.steps}, Sampler: LCM, CFG scale: {job.guidance:g}, Seed: {job.seed}, "
        f"Size: {job.width}x{job.height}, Model: {profile}"
    )
    # A1111's ControlNet extension appends one `ControlNet N: "..."` per unit to this line.
    controls = describe(getattr(job, "control", None))
    lines.append(settings if controls is None else f"{settings}, {controls}")
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str) -> bytes:
    info = PngInfo()
    info.add_itxt("parameters", parameters)  # iTXt: UTF-8, so any prompt survives
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _exif(comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.endian = ">"  # the UTF-16 of the comment follows the EXIF byte order
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = USER_COMMENT_UNICODE + comment
    return exif.tobytes()


def parameters_exif(parameters: str, limit: int | None = None) -> bytes:
    """EXIF bytes carrying the parameters. With a `limit` (JPEG's APP1 segment holds 64 KB) a
    prompt too long for it is cut, marked with '…', and the settings line is kept whole."""
    data = _exif(parameters.encode("utf-16-be"))
    if limit is None or len(data) <= limit:
        return data
    head, _, tail = parameters.rpartition("\n")
    tail_units = ("…\n" + tail).encode("utf-16-be")
    room = limit - len(_exif(b"")) - len(tail_units)
    units = head.encode("utf-16-be")[: max(0, room) // 2 * 2]
    if len(units) >= 2 and 0xD8 <= units[-2] <= 0xDB:  # never end on half a surrogate pair
        units = units[:-2]
    return _exif(units + tail_units)


def read_parameters(data: bytes) -> str | None:
    """The parameters text an encoded image carries (tests, and whoever reads images back)."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and comment.startswith(USER_COMMENT_UNICODE):
        return comment[len(USER_COMMENT_UNICODE) :].decode("utf-16-be")
    return None


def encode_image(image: Image.Image, parameters: str, output: OutputFormat) -> bytes:
    if output.name == "png":
        return encode_png(image, parameters)
    if image.mode != "RGB":  # neither JPEG nor lossy WebP keeps an alpha channel here
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if output.name == "jpeg":
        # Baseline, no optimize pass, fixed subsampling: libjpeg's output is then a function of
        # the pixels and these settings alone.
        image.save(
            buffer,
            format="JPEG",
            quality=output.quality,
            optimize=False,
            progressive=False,
            subsampling="4:2:0",
            exif=parameters_exif(parameters, JPEG_EXIF_LIMIT),
        )
    elif output.name == "webp":
        image.save(
            buffer,
            format="WEBP",
            quality=output.quality,
            method=WEBP_METHOD,
            lossless=False,
            exif=parameters_exif(parameters),
        )
    else:  # pragma: no cover - the producer validated the format
        raise ValueError(f"unknown image format {output.name!r}")
    return buffer.getvalue()


def encode_job(image: Image.Image, job: Any, batch: Any) -> Encoded:
    """A job's image in its batch's format: (bytes, Content-Type, key extension)."""
    output = OutputFormat.of(batch.options)
    data = encode_image(image, parameters_text(job, batch.profile), output)
    return Encoded(data, output.content_type, output.ext)
