"""The pinned pipeline: one per worker process, loaded once, kept for the process's life.

Every profile, the generated `tiny` included, loads through the same steps real models take:
`from_pretrained` (or `from_single_file`), `LCMScheduler.from_config`, `load_lora_weights`,
`fuse_lora`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmq.errors import ModelLoadError
from lcmq.profiles import GENERATED_PREFIX, NULL_FAMILY, Profile, preflight
from lcmq.settings import Settings

log = logging.getLogger("lcmq.worker")

LCM_ADAPTER = "lcm"


@dataclass
class LoadedPipeline:
    profile: Profile
    pipe: Any
    device: str
    dtype: Any
    load_s: float


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' requested but CUDA is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(profile: Profile, device: str):
    import torch

    if device == "cpu":
        return torch.float32  # half precision on CPU is slow and poorly supported
    return getattr(torch, profile.dtype)


def _resolve(ref: str, settings: Settings) -> str:
    if ref.startswith(GENERATED_PREFIX):
        from worker.generated import ensure_generated

        name = ref[len(GENERATED_PREFIX):]
        model_name = name.removesuffix("-lcm-lora")
        model_dir, lora_dir = ensure_generated(model_name, settings.models_path)
        return str(lora_dir if name.endswith("-lcm-lora") else model_dir)
    return ref


def _pipeline_class(profile: Profile):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if profile.family == "sd15" else StableDiffusionXLPipeline


def _load_lora(pipe, ref: str) -> None:
    path = Path(ref)
    kwargs: dict[str, Any] = {"adapter_name": LCM_ADAPTER, "low_cpu_mem_usage": True}
    if path.is_file():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    else:
        pipe.load_lora_weights(ref, **kwargs)


def quiet_libraries() -> None:
    """Loading bars and hub warnings are noise in a worker's log; lcmq logs the load itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class NullPipeline:
    """Renders nothing: one fixed image per prompt, at the requested size (the `null` profile)."""

    tokenizer = None

    def __call__(self, prompt: list[str], width: int, height: int, **_ignored):
        from types import SimpleNamespace

        from PIL import Image

        # One image object per prompt, never one shared: Pillow's save() keeps its options on the
        # image (encoderinfo), so the upload threads encoding a shared one mix up their parameters.
        return SimpleNamespace(images=[Image.new("RGB", (width, height), (127, 127, 127)) for _ in prompt])


def load_pipeline(profile: Profile, settings: Settings) -> LoadedPipeline:
    """Load, swap the scheduler, load and fuse the LCM-LoRA; ModelLoadError on any failure."""
    if profile.family == NULL_FAMILY:
        return LoadedPipeline(profile, NullPipeline(), "cpu", None, 0.0)
    import torch
    from diffusers import LCMScheduler

    quiet_libraries()
    started = time.perf_counter()
    preflight(profile)
    device = pick_device(settings.device)
    dtype = _dtype(profile, device)
    if device == "cpu" and settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        # 1. Base model: a diffusers folder / hub id, or a single-file checkpoint.
        base = _resolve(profile.base, settings)
        cls = _pipeline_class(profile)
        extra = {"safety_checker": None, "requires_safety_checker": False} if profile.family == "sd15" else {}
        if base.endswith((".safetensors", ".ckpt")):
            pipe = cls.from_single_file(base, dtype=dtype, **extra)
        else:
            pipe = cls.from_pretrained(base, dtype=dtype, **extra)
        # 2. The LCM scheduler, configured from the model's own scheduler.
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        # 3. The LCM-LoRA, fused into the weights: no per-step adapter cost.
        _load_lora(pipe, _resolve(profile.lcm_lora, settings))
        pipe.fuse_lora(adapter_names=[LCM_ADAPTER])
        pipe.to(device)
        if device != "cpu":
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"profile {profile.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    load_s = time.perf_counter() - started
    log.info("pipeline loaded", extra={"profile": profile.name, "device": device, "dtype": str(dtype),
                                       "load_s": round(load_s, 2), "pid": os.getpid()})
    return LoadedPipeline(profile, pipe, device, dtype, load_s)


def truncation_warnings(loaded: LoadedPipeline, prompts: list[str]) -> list[str | None]:
    """A warning per prompt longer than the text encoder reads (the pipeline truncates it)."""
    tokenizer = loaded.pipe.tokenizer
    if tokenizer is None:
        return [None] * len(prompts)
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
    warnings = [f"prompt truncated to {limit} tokens (had {n})" if n > limit else None for n in lengths]
    for prompt, warning in zip(prompts, warnings):
        if warning:
            log.warning("prompt truncated", extra={"tokens_limit": limit, "prompt_chars": len(prompt)})
    return warnings


_PINNED: dict[str, LoadedPipeline] = {}
_PIN_LOCK = threading.Lock()


def pinned_pipeline(profile: Profile, settings: Settings) -> LoadedPipeline:
    """This process's pipeline for the profile, loaded on first use and never again.

    The lock makes a task that arrives while `preload` is still loading wait for that load
    instead of starting a second one.
    """
    with _PIN_LOCK:
        loaded = _PINNED.get(profile.name)
        if loaded is None:
            loaded = _PINNED[profile.name] = load_pipeline(profile, settings)
        return loaded


def preload(profile: Profile, settings: Settings) -> threading.Thread:
    """Load the pipeline in the background as soon as a worker process starts.

    Celery kills process-init handlers after 4 s, so the load runs in a thread; the first task
    waits for it through the lock. A failed load is logged here and raised again by that task.
    """
    def load():
        try:
            pinned_pipeline(profile, settings)
        except Exception as exc:  # noqa: BLE001 - the first task reports it against its jobs
            log.error("pipeline preload failed", extra={"profile": profile.name, "error": str(exc)})

    thread = threading.Thread(target=load, name="lcmq-preload", daemon=True)
    thread.start()
    return thread
