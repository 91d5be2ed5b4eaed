"""The `null` profile's renderer: no model, no device, so every millisecond a worker spends is
the queue's own (bench/dispatch.py) — or, paced and fed real-looking images, a stand-in for a
GPU that lets the real worker loop be measured at GPU rates (bench/host.py).

- Without settings it returns a flat grey image per prompt, at the requested size, at once.
- `null_images_dir`: images decoded once, at load, handed out in turn for requests of their
  size (several distinct ones, so nothing downstream can cache an answer).
- `null_images_per_s`: a call of n images takes n ÷ rate seconds from its start, asleep, like a
  GPU kernel the calling thread waits for; the host side's work is what is left to measure.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from lcmq.settings import Settings

log = logging.getLogger("lcmq.worker")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GREY = (127, 127, 127)


def load_images(folder: Path) -> dict[tuple[int, int], list[Image.Image]]:
    """The folder's images by size, decoded now (before any timing), in name order."""
    by_size: dict[tuple[int, int], list[Image.Image]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                by_size.setdefault(image.size, []).append(image.convert("RGB"))
    return by_size


class NullPipeline:
    """Renders nothing: an image per prompt at the requested size (the `null` profile)."""

    tokenizer = None

    def __init__(
        self,
        images: dict[tuple[int, int], list[Image.Image]] | None = None,
        images_per_s: float | None = None,
    ):
        self._turns: dict[tuple[int, int], Iterator[Image.Image]] = {
            size: itertools.cycle(found) for size, found in (images or {}).items()
        }
        self.images_per_s = images_per_s

    @classmethod
    def from_settings(cls, settings: Settings) -> NullPipeline:
        images = load_images(settings.null_images_dir) if settings.null_images_dir else {}
        if images or settings.null_images_per_s:
            log.info(
                "null renderer as a stand-in",
                extra={
                    "images": sum(len(found) for found in images.values()),
                    "sizes": ",".join(f"{w}x{h}" for w, h in sorted(images)) or None,
                    "images_per_s": settings.null_images_per_s,
                    "pid": os.getpid(),
                },
            )
        return cls(images, settings.null_images_per_s)

    def __call__(self, prompt: list[str], width: int, height: int, **_ignored):
        started = time.perf_counter()
        turn = self._turns.get((width, height))
        # One image object per prompt, never one shared: Pillow's save() keeps its options on the
        # image (encoderinfo), so the upload threads encoding a shared one mix up their parameters.
        images = [next(turn).copy() if turn else Image.new("RGB", (width, height), GREY) for _ in prompt]
        if self.images_per_s:
            # The slot this call's images take on a device that renders images_per_s; sleeping
            # leaves the cores to the host side, as a GPU kernel would.
            time.sleep(max(0.0, started + len(prompt) / self.images_per_s - time.perf_counter()))
        return SimpleNamespace(images=images)
