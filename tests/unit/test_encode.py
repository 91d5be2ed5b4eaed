"""Image formats: --format/--quality validation, and encoders that are reproducible and carry
the job's parameters (PNG iTXt, JPEG/WebP EXIF UserComment)."""

from __future__ import annotations

import io
from dataclasses import asdict

import pytest
from helpers import job_record
from PIL import Image

from lcmq.errors import InputError
from lcmq.formats import FORMATS, OutputFormat, check_output
from lcmq.repository import BatchRecord
from lcmq.spec import BatchOptions
from worker.encode import encode_job, parameters_text, read_parameters


def _batch(image_format: str = "png", quality: int | None = None) -> BatchRecord:
    from datetime import UTC, datetime

    options = asdict(BatchOptions(model="tiny", image_format=image_format, quality=quality))
    return BatchRecord(
        id="b1",
        name=None,
        profile="tiny",
        total=1,
        seed=0,
        output="",
        options=options,
        created_at=datetime.now(UTC),
        idempotency_key=None,
        priority=0,
        canceled_at=None,
        published_at=None,
        manifest_at=None,
    )


def _image(seed: int = 0) -> Image.Image:
    # Noise-like content, so a lossy encoder has real work (a flat image hides quality changes).
    return Image.frombytes("RGB", (64, 64), bytes((i * 31 + seed * 7) % 251 for i in range(64 * 64 * 3)))


@pytest.mark.parametrize(
    ("image_format", "quality", "expected"),
    [
        ("png", None, ("png", None)),
        ("webp", None, ("webp", 90)),
        ("jpeg", None, ("jpeg", 90)),
        ("jpg", 85, ("jpeg", 85)),
        ("webp", 1, ("webp", 1)),
        ("jpeg", 100, ("jpeg", 100)),
    ],
)
def test_valid_formats_resolve_their_quality(image_format, quality, expected):
    assert check_output("f.txt", image_format, quality) == expected


@pytest.mark.parametrize(
    ("image_format", "quality", "field", "phrase"),
    [
        ("gif", None, "--format", "must be one of png, webp, jpeg (got 'gif')"),
        ("PNG ", None, "--format", "must be one of"),
        (None, None, "--format", "must be one of"),
        ("webp", 0, "--quality", "between 1 and 100 (got 0)"),
        ("jpeg", 101, "--quality", "between 1 and 100 (got 101)"),
        ("jpeg", 85.5, "--quality", "must be an integer"),
        ("jpeg", True, "--quality", "must be an integer"),
        ("png", 80, "--quality", "applies to webp and jpeg only"),
    ],
)
def test_bad_format_or_quality_names_the_flag(image_format, quality, field, phrase):
    with pytest.raises(InputError) as caught:
        check_output("prompts.txt", image_format, quality)
    assert caught.value.field == field and phrase in caught.value.message
    assert str(caught.value).startswith(f"prompts.txt:{field}: ")


def test_submit_refuses_a_bad_format_before_touching_anything(tmp_path, monkeypatch):
    import lcmq

    # No database, broker or storage exists here: the refusal must come before any of them.
    monkeypatch.setenv("LCMQ_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    monkeypatch.setenv("LCMQ_BROKER_URL", "redis://127.0.0.1:9/0")
    from lcmq.settings import reset_settings

    reset_settings()
    try:
        with pytest.raises(InputError, match="--format"):
            lcmq.submit(["a red fox"], model="null", image_format="tiff")
        with pytest.raises(InputError, match="--quality"):
            lcmq.submit(["a red fox"], model="null", image_format="webp", quality=0)
    finally:
        monkeypatch.undo()
        reset_settings()


def test_format_is_part_of_the_idempotency_key():
    from lcmq.api import _idempotency_key
    from lcmq.profiles import get_profile

    profile = get_profile("tiny")

    def key(**options):
        return _idempotency_key("c" * 64, BatchOptions(model="tiny", **options), profile, 32)

    png, webp, webp85, jpeg = (
        key(),
        key(image_format="webp", quality=90),
        key(image_format="webp", quality=85),
        key(image_format="jpeg", quality=90),
    )
    assert len({png, webp, webp85, jpeg}) == 4
    # PNG batches keep the key they had before formats existed (a resubmission still finds them).
    import hashlib
    import json

    old = {
        "content": "c" * 64,
        "options": {
            k: v
            for k, v in asdict(BatchOptions(model="tiny")).items()
            if k not in ("image_format", "quality", "matrix", "loras", "controls")
        },
        "profile": profile.to_dict(),
        "chunk_size": 32,
    }
    assert png == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()


@pytest.mark.parametrize(
    ("image_format", "pil_format", "content_type", "ext"),
    [
        ("png", "PNG", "image/png", "png"),
        ("webp", "WEBP", "image/webp", "webp"),
        ("jpeg", "JPEG", "image/jpeg", "jpg"),
    ],
)
def test_encoders_are_deterministic_and_carry_the_parameters(image_format, pil_format, content_type, ext):
    job = job_record(3, prompt="a fox in the snow, ünïcödé 🦊", negative_prompt="blurry", seed=77, guidance=1.5)
    batch = _batch(image_format, FORMATS[image_format].default_quality)
    first = encode_job(_image(), job, batch)
    again = encode_job(_image(), job, batch)
    assert first == again  # same job, same bytes
    data, got_type, got_ext = first
    assert (got_type, got_ext) == (content_type, ext)
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format and image.size == (64, 64) and image.mode == "RGB"
    assert read_parameters(data) == parameters_text(job, "tiny")
    assert "Negative prompt: blurry\nSteps: 4, Sampler: LCM, CFG scale: 1.5, Seed: 77," in read_parameters(data)
    assert encode_job(_image(seed=1), job, batch).data != data  # other pixels, other bytes


@pytest.mark.parametrize("image_format", ["webp", "jpeg"])
def test_quality_changes_the_bytes(image_format):
    job = job_record(0)
    low = encode_job(_image(), job, _batch(image_format, 20)).data
    high = encode_job(_image(), job, _batch(image_format, 95)).data
    assert len(low) < len(high)


def test_jpeg_keeps_the_settings_line_of_a_prompt_too_long_for_its_exif():
    job = job_record(0, prompt="a very long prompt " * 3000, seed=5)  # 57,000 characters: past 64 KB in UTF-16
    data = encode_job(_image(), job, _batch("jpeg", 90)).data
    text = read_parameters(data)
    assert text.startswith("a very long prompt ") and "…\nSteps: 4, Sampler: LCM" in text and "Seed: 5," in text
    assert len(text) < len(job.prompt)


def test_batches_from_before_formats_are_png():
    output = OutputFormat.of({"model": "tiny", "steps": None})  # options as stored before formats
    assert (output.name, output.ext, output.content_type, output.quality) == ("png", "png", "image/png", None)


def _photo_like(size: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus fine texture: what the Average filter and zlib are meant for."""
    import numpy as np

    rng = np.random.default_rng(size)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    pixels = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_writer_keeps_every_pixel_and_the_parameters(mode):
    import numpy as np

    from worker.encode import encode_png

    image = _photo_like(48, mode)
    data = encode_png(image, "a fox 🦊\nSteps: 4", level=1)
    back = Image.open(io.BytesIO(data))
    back.load()
    assert back.format == "PNG" and back.mode == mode and back.size == (48, 48)
    assert np.array_equal(np.asarray(back), np.asarray(image))  # lossless, the filter inverted exactly
    assert read_parameters(data) == "a fox 🦊\nSteps: 4"


def test_png_compress_level_trades_bytes_and_each_level_is_reproducible(monkeypatch):
    from lcmq.settings import reset_settings
    from worker.encode import encode_png

    image = _photo_like(96)
    stored = encode_png(image, "p", level=0)
    fast, small = encode_png(image, "p", level=1), encode_png(image, "p", level=9)
    assert len(small) <= len(fast) < len(stored)
    assert fast == encode_png(image.copy(), "p", level=1)
    monkeypatch.setenv("LCMQ_PNG_COMPRESS_LEVEL", "9")
    reset_settings()
    try:
        assert encode_png(image, "p") == small  # the setting is the default level
    finally:
        monkeypatch.delenv("LCMQ_PNG_COMPRESS_LEVEL")
        reset_settings()


def test_png_of_another_mode_goes_through_pillow():
    from worker.encode import encode_png

    image = _photo_like(32).convert("P")
    back = Image.open(io.BytesIO(encode_png(image, "p", level=1)))
    assert back.mode == "P" and back.info["parameters"] == "p"
