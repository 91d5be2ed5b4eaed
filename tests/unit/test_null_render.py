"""The null profile's renderer as a stand-in GPU (bench/host.py): it hands out the prepared
images of the requested size in turn, a fresh object each time, and paces each call."""

from __future__ import annotations

import time

from PIL import Image

from lcmq.settings import Settings
from worker.null_render import NullPipeline, load_images


def _save(folder, name: str, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    Image.new("RGB", size, color).save(folder / name)


def test_prepared_images_are_handed_out_in_turn_by_size(tmp_path):
    _save(tmp_path, "a.png", (16, 16), (255, 0, 0))
    _save(tmp_path, "b.png", (16, 16), (0, 255, 0))
    _save(tmp_path, "c.png", (32, 16), (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    pipe = NullPipeline.from_settings(Settings(null_images_dir=tmp_path))
    images = pipe(prompt=["p"] * 3, width=16, height=16).images
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 255, 0), (255, 0, 0)]
    assert len({id(image) for image in images}) == 3  # never one object twice: save() keeps options on it
    wide = pipe(prompt=["p"], width=32, height=16).images[0]
    assert wide.getpixel((0, 0)) == (0, 0, 255)
    other = pipe(prompt=["p"], width=8, height=8).images[0]  # no prepared image of that size
    assert other.size == (8, 8) and other.getpixel((0, 0)) == (127, 127, 127)
    assert sorted(load_images(tmp_path)) == [(16, 16), (32, 16)]


def test_a_paced_call_takes_its_images_share_of_a_second():
    pipe = NullPipeline(images_per_s=40.0)
    started = time.perf_counter()
    images = pipe(prompt=["p"] * 4, width=8, height=8).images
    assert len(images) == 4 and time.perf_counter() - started >= 4 / 40.0
    unpaced = NullPipeline()
    started = time.perf_counter()
    unpaced(prompt=["p"] * 4, width=8, height=8)
    assert time.perf_counter() - started < 4 / 40.0
