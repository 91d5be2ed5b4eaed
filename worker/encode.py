"""Image encoding with the job's parameters embedded, byte-for-byte reproducible.

- PNG: an iTXt `parameters` chunk (UTF-8). Written here, not by Pillow: Pillow's PNG encoder
  picks a filter per row by trying all five (~18 ms of a 512² RGB image's ~35 ms at zlib
  level 1, and mostly under the GIL); the Average filter on every row, computed with numpy over
  the whole image (~1 ms), compresses photo-like images as well, and zlib releases the GIL, so
  the store pipeline's threads encode on every core (docs/benchmarks.md, host side).
- JPEG and WebP: the same text in EXIF UserComment (tag 0x9286 of the Exif IFD), as
  `UNICODE\\0` + UTF-16 in the EXIF's own byte order (big-endian). That is where A1111-style
  readers (and exiftool's UserComment) look for the parameters of a JPEG or WebP.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from lcmq.controls import describe
from lcmq.formats import OutputFormat
from lcmq.settings import get_settings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}  # 8 bits per sample; other modes go through Pillow
PNG_FILTER_AVERAGE = 3
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


def encode_png(image: Image.Image, parameters: str, level: int | None = None) -> bytes:
    """PNG with the parameters in an iTXt chunk, at zlib `level` (default: png_compress_level)."""
    level = get_settings().png_compress_level if level is None else level
    if image.mode not in PNG_COLOR_TYPES:
        info = PngInfo()
        info.add_itxt("parameters", parameters)  # iTXt: UTF-8, so any prompt survives
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info, compress_level=level)
        return buffer.getvalue()
    # One copy of the pixels (PIL to numpy), filtered in place into the rows zlib reads.
    pixels = np.asarray(image)
    height, width = image.height, image.width
    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOR_TYPES[image.mode], 0, 0, 0)
    # iTXt: keyword, NUL, not compressed (0), method 0, empty language tag and translated keyword.
    text = b"parameters\x00\x00\x00\x00\x00" + parameters.encode("utf-8")
    filtered = average_filtered(pixels.reshape(height, -1), pixels.size // (height * width))
    rows = zlib.compress(filtered.data, level)  # the array's own buffer, not a copy
    return b"".join(
        (PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"iTXt", text), _png_chunk(b"IDAT", rows))
    ) + _png_chunk(b"IEND", b"")


def average_filtered(rows: np.ndarray, channels: int) -> np.ndarray:
    """PNG scanlines with filter 3 (Average) on every row: each byte minus the mean (rounded
    down) of the byte to its left and the one above, both raw, 0 outside the image."""
    height, stride = rows.shape
    predictor = np.zeros((height, stride), np.uint16)
    predictor[:, channels:] = rows[:, :-channels]  # left
    predictor[1:] += rows[:-1]  # above
    predictor >>= 1
    out = np.empty((height, stride + 1), np.uint8)
    out[:, 0] = PNG_FILTER_AVERAGE
    np.subtract(rows, predictor, out=out[:, 1:], casting="unsafe")  # modulo 256, as PNG wants
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


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
