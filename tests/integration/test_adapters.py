"""Style LoRAs and img2img on the real tiny pipeline, in this process: the adapter LRU (bounded,
memory flat while sets cycle), bad LoRAs and init images failing with clear errors, and the
img2img pipeline sharing the loaded weights."""

from __future__ import annotations

import gc
import io
import os
import resource

import pytest
from helpers import job_record
from PIL import Image

from lcmq.profiles import BUILTIN_PROFILES
from lcmq.settings import get_settings

LORAS = 6
CACHE_SIZE = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, models_dir):
    """A tiny pipeline of this module's own (style adapters change its UNet), an adapter cache
    bounded at CACHE_SIZE, and LORAS generated style LoRAs."""
    import torch

    from lcmq.settings import reset_settings
    from worker.generated import ensure_generated, generate_style_lora
    from worker.pipeline import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared: no oversubscribed spinning
    saved = {k: os.environ.get(k) for k in ("LCMQ_MODELS_DIR", "LCMQ_LORA_CACHE_SIZE")}
    os.environ["LCMQ_MODELS_DIR"] = str(models_dir)
    os.environ["LCMQ_LORA_CACHE_SIZE"] = str(CACHE_SIZE)
    reset_settings()
    try:
        settings = get_settings()
        loaded = load_pipeline(BUILTIN_PROFILES["tiny"], settings)
        model_dir, _ = ensure_generated("tiny-sd15", settings.models_path)
        folder = tmp_path_factory.mktemp("loras")
        paths = [
            str(generate_style_lora(model_dir, folder / f"style{i}.safetensors", seed=100 + i)) for i in range(LORAS)
        ]
        yield loaded, paths, folder
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_settings()


def _png(loaded, jobs, init_images=None) -> list[bytes]:
    from worker.encode import encode_png
    from worker.render import render

    return [encode_png(image, "") for image in render(loaded, jobs, init_images)]


def _styled(index: int, loras, **changes):
    return job_record(index, seed=5, prompt="a lighthouse at dusk", loras=loras, **changes)


def _set(*pairs):
    return [{"name": f"s{i}", "path": path, "weight": weight} for i, (path, weight) in enumerate(pairs)]


def test_styles_change_the_image_and_the_lcm_lora_stays_in_the_weights(tiny):
    from worker.adapters import adapter_cache

    loaded, paths, _ = tiny
    (plain_before,) = _png(loaded, [_styled(0, None)])
    (strong,) = _png(loaded, [_styled(0, _set((paths[0], 0.8)))])
    cache = adapter_cache(loaded.pipe, get_settings())
    assert cache.lcm_mode == "baked"  # the fused LCM-LoRA's layers are gone, its weights stay
    weak, other, strong_again = (
        _png(loaded, [_styled(0, _set((paths[0], 0.4)))])[0],
        _png(loaded, [_styled(0, _set((paths[1], 0.8)))])[0],
        _png(loaded, [_styled(0, _set((paths[0], 0.8)))])[0],
    )
    (plain_after,) = _png(loaded, [_styled(0, None)])
    assert len({plain_before, strong, weak, other}) == 4
    assert strong_again == strong
    # Baking the LCM-LoRA and loading styles leaves unstyled renders bit for bit as they were.
    assert plain_after == plain_before


def test_img2img_pipeline_shares_the_loaded_components(tiny):
    from worker.img2img import img2img_pipeline

    loaded, _, _ = tiny
    i2i = img2img_pipeline(loaded.pipe)
    assert i2i is img2img_pipeline(loaded.pipe)  # built once
    assert i2i.unet is loaded.pipe.unet and i2i.vae is loaded.pipe.vae
    assert i2i.text_encoder is loaded.pipe.text_encoder and i2i.scheduler is loaded.pipe.scheduler
    assert "Img2Img" in type(i2i).__name__


def test_bad_loras_fail_with_a_clear_error_and_leave_nothing_loaded(tiny):
    import torch
    from safetensors.torch import load_file, save_file

    from worker.adapters import LoraLoadError, adapter_cache

    loaded, paths, folder = tiny
    (folder / "text.safetensors").write_text("not a safetensors file")
    save_file({"foo.bar.lora_A.weight": torch.zeros(4, 4)}, str(folder / "keys.safetensors"))
    weights = load_file(paths[0])
    save_file(
        {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v for k, v in weights.items()},
        str(folder / "shapes.safetensors"),
    )
    cache = adapter_cache(loaded.pipe, get_settings())
    before = cache.style_adapters()
    for name, expected in (
        ("text", "cannot be loaded"),
        ("keys", "no weights for any layer"),
        ("shapes", "cannot be loaded"),
        ("missing", "No such file"),
    ):
        with pytest.raises(LoraLoadError, match=expected):
            _png(loaded, [_styled(0, _set((str(folder / f"{name}.safetensors"), 1.0)))])
        assert cache.style_adapters() == before
    # The worker goes on: good sets still render.
    assert _png(loaded, [_styled(0, _set((paths[2], 0.5)))])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def test_cycling_adapter_sets_keeps_memory_and_adapters_bounded(tiny):
    """30 distinct sets over 6 LoRAs with room for 3: loads and evictions all the way, and after
    a warm-up cycle the process does not grow (diffusers #8532 / peft #1639 are about this)."""
    from worker.adapters import adapter_cache

    loaded, paths, _ = tiny
    cache = adapter_cache(loaded.pipe, get_settings())
    assert cache.capacity == CACHE_SIZE
    sets = []
    for i in range(30):  # singles and pairs, different weights: every set distinct
        first, second = paths[i % LORAS], paths[(i * 5 + 1) % LORAS]
        pairs = [(first, 0.3 + 0.1 * (i % 5))] + ([(second, -0.5)] if i % 3 and second != first else [])
        sets.append(_set(*pairs))
    seen_max = 0

    def cycle(sets):
        nonlocal seen_max
        for index, loras in enumerate(sets):
            # One step at 32x32: the adapters' loading and eviction is what is measured here.
            assert _png(loaded, [_styled(index, loras, steps=1, width=32, height=32)])
            seen_max = max(seen_max, len(cache.style_adapters()))
            assert len(cache.loaded) == len(cache.style_adapters()) <= CACHE_SIZE

    cycle(sets[:12])  # warm-up, every LoRA loaded and evicted: allocator pools, lazy imports
    gc.collect()
    warm = _rss_mb()
    cycle(sets)
    gc.collect()
    grown = _rss_mb() - warm
    assert seen_max == CACHE_SIZE
    # Measured: ~0 MB bounded; the same 30 sets with an unbounded cache grow ~14 MB.
    assert grown < 5, f"RSS grew {grown:.1f} MB over 30 adapter-set changes"


def test_init_images_are_checked_and_fitted(tiny, tmp_path):

    from worker.img2img import InitImageError, load_init_image, load_init_images

    settings = get_settings()
    wide = tmp_path / "wide.png"
    Image.new("RGBA", (200, 100), (10, 200, 30, 128)).save(wide)
    image = load_init_image(wide.as_uri(), 64, 48, settings)
    assert image.size == (64, 48) and image.mode == "RGB"
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    Image.new("L", (2100, 8)).save(tmp_path / "huge.png")
    for name, expected in (
        ("junk.png", "not a readable image"),
        ("huge.png", "at most 2048"),
        ("gone.png", "cannot be read"),
    ):
        with pytest.raises(InitImageError, match=expected):
            load_init_image((tmp_path / name).as_uri(), 64, 64, settings)
    jobs = [
        job_record(i, init_image=(tmp_path / name).as_uri(), strength=0.5)
        for i, name in enumerate(["wide.png", "junk.png", "wide.png"])
    ]
    ready, images, bad = load_init_images(jobs, settings)
    assert [j.index for j in ready] == [0, 2] and len(images) == 2
    assert [(job.index, "not a readable image" in reason) for job, reason in bad] == [(1, True)]
    # and they render, as one img2img call
    loaded, _, _ = tiny
    pngs = _png(loaded, ready, images)
    assert [Image.open(io.BytesIO(p)).size for p in pngs] == [(64, 64), (64, 64)]
