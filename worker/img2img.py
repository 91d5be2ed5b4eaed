"""img2img: jobs with an `init_image` render through the image-to-image pipeline built from the
pinned one (`AutoPipelineForImage2Image.from_pipe`: the same UNet, VAE, text encoder and LCM
scheduler objects, no second copy of the weights; style adapters on that UNet apply to both).

Each init image is read (s3:// or file://) and checked before its micro-batch renders: at most
`max_init_image_bytes`, decodable, at most MAX_SIDE pixels a side, convertible to RGB (alpha is
dropped, EXIF orientation applied). It is then fitted to the job's width and height: scaled to
cover the size and centre-cropped (ImageOps.fit), so a job's size always wins and the aspect
ratio is kept. A bad image fails its own job with the reason; its micro-batch neighbours render.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from lcmq.errors import PermanentError, PermanentStorageError
from lcmq.repository import JobRecord
from lcmq.settings import Settings
from lcmq.spec import MAX_SIDE  # as for a job's own width and height
from lcmq.storage import read_url

log = logging.getLogger("lcmq.worker")


class InitImageError(PermanentError):
    """An init image that cannot be read or used: its job fails, the others go on."""


def _decode(data: bytes, url: str, what: str):
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) > MAX_SIDE:  # before decoding the pixels: no decompression bombs
                raise InitImageError(
                    f"{what} {url} is {image.size[0]}x{image.size[1]}; at most {MAX_SIDE} pixels a side"
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except InitImageError:
        raise
    except Image.UnidentifiedImageError as exc:  # its text names the BytesIO it read, not the file
        raise InitImageError(
            f"{what} {url} is not a readable image: not a format Pillow can open (PNG, JPEG, WebP, ...)"
        ) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InitImageError(f"{what} {url} is not a readable image: {type(exc).__name__}: {exc}") from exc


Reader = Callable[[str], bytes]  # an object store's `read` (worker/ports.py)


def load_init_image(
    url: str, width: int, height: int, settings: Settings, read: Reader | None = None, what: str = "init image"
):
    """The job's init image (or, `what` says, another input image: a control image) as an RGB
    PIL image of exactly width x height, read by `read` (by default with this machine's own
    credentials). Transient storage errors propagate (the task retries); everything else is an
    InitImageError whose message starts with `what` and the URL."""
    from PIL import Image, ImageOps

    try:
        if read is None:
            data = read_url(
                url, settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout_s, settings.s3_max_attempts
            )
        else:
            data = read(url)
    except PermanentStorageError as exc:
        raise InitImageError(f"{what} {url} cannot be read: {exc}") from exc
    if len(data) > settings.max_init_image_bytes:
        raise InitImageError(
            f"{what} {url} has {len(data)} bytes; at most {settings.max_init_image_bytes} (LCMQ_MAX_INIT_IMAGE_BYTES)"
        )
    image = _decode(data, url, what)
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    return image


def load_init_images(
    jobs: Sequence[JobRecord], settings: Settings, read: Reader | None = None
) -> tuple[list[JobRecord], list[Any] | None, list[tuple[JobRecord, str]]]:
    """(jobs that can render, their init images or None for text2img, (job, reason) of bad ones).
    A micro-batch is all img2img or all text2img: strength is part of the render shape."""
    if not jobs or jobs[0].init_image is None:
        return list(jobs), None, []
    ready, images, bad = [], [], []
    cache: dict[str, Any] = {}  # the same init image for several jobs of one size: read once
    for job in jobs:
        try:
            assert job.init_image is not None  # the caller passes img2img jobs only
            key = f"{job.init_image}@{job.width}x{job.height}"
            if key not in cache:
                cache[key] = load_init_image(job.init_image, job.width, job.height, settings, read)
            ready.append(job)
            images.append(cache[key])
        except InitImageError as exc:
            bad.append((job, f"{type(exc).__name__}: {exc}"))
    return ready, images, bad


_PIPES: dict[int, Any] = {}
_PIPES_LOCK = threading.Lock()


def img2img_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline over the same components, built once per text2img pipeline."""
    with _PIPES_LOCK:
        built = _PIPES.get(id(pipe))
        if built is None or built.unet is not pipe.unet:
            from diffusers import AutoPipelineForImage2Image

            # vae= named: from_pipe drops a component whose class the new pipeline's signature
            # does not list, as it does an AutoencoderTiny (vae_decoder = "tiny").
            built = AutoPipelineForImage2Image.from_pipe(pipe, vae=pipe.vae)
            built.set_progress_bar_config(disable=True)
            _PIPES[id(pipe)] = built
            log.info("img2img pipeline built", extra={"class": type(built).__name__})
        return built
