"""ControlNet and T2I-Adapter renders: control images, canny, the loaded models, the pipelines.

A job's `control` (lcmq.controls) names conditioning models and brings one image each. Before a
micro-batch renders, each job's control images are read and checked like init images (at most
`max_init_image_bytes`, decodable, at most MAX_SIDE a side), fitted to the job's size and, with
`preprocess = "canny"`, turned into an edge map here (no model, no OpenCV: `canny` below). A bad
image fails its own job with a message naming it; its micro-batch neighbours render.

The models are loaded once and kept in a bounded LRU per pipeline (`control_cache_size`); the
pipeline that runs them is built from the pinned one with `from_pipe`: the same UNet (the
LCM-LoRA fused in, style adapters on it), VAE, text encoders and LCM scheduler, no second copy
of the base. A ControlNet is never given a LoRA: styles live on the UNet only.

`plan_call` decides the pipeline class and call arguments without torch, so the wiring is
testable without loading anything.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lcmq.controls import CONTROLNET, MODEL_CLASSES, T2I_ADAPTER
from lcmq.errors import PermanentError
from lcmq.repository import JobRecord
from lcmq.settings import Settings
from worker.img2img import InitImageError, Reader, load_init_image

log = logging.getLogger("lcmq.worker")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth")
# (family group, kind, img2img) -> the diffusers pipeline class. T2I-Adapters have no img2img
# pipeline in diffusers; the validator refuses that combination at submit.
PIPELINE_CLASSES = {
    ("sd15", CONTROLNET, False): "StableDiffusionControlNetPipeline",
    ("sd15", CONTROLNET, True): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", T2I_ADAPTER, False): "StableDiffusionAdapterPipeline",
    ("sdxl", CONTROLNET, False): "StableDiffusionXLControlNetPipeline",
    ("sdxl", CONTROLNET, True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", T2I_ADAPTER, False): "StableDiffusionXLAdapterPipeline",
}


class ControlImageError(InitImageError):
    """A control image that cannot be read or used: its job fails, the others go on."""


class ControlLoadError(PermanentError):
    """A control model is missing, of another kind than the job says, or does not fit the base:
    the jobs that name it fail, the worker goes on."""


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlCall:
    pipeline_class: str
    kwargs: dict[str, Any]  # the call's control arguments, images excepted


def plan_call(family: str, controls: Sequence[Mapping[str, Any]], img2img: bool) -> ControlCall:
    """The pipeline class and the control arguments of one call over jobs sharing this set."""
    kind = controls[0]["type"]
    group = "sd15" if family == "sd15" else "sdxl"
    cls = PIPELINE_CLASSES.get((group, kind, img2img))
    if cls is None:
        raise ControlLoadError(f"{kind} with img2img has no pipeline; use a ControlNet")
    scales = [float(entry["scale"]) for entry in controls]
    one = len(controls) == 1
    if kind == CONTROLNET:
        kwargs: dict[str, Any] = {
            "controlnet_conditioning_scale": scales[0] if one else scales,
            "control_guidance_start": controls[0]["start"] if one else [e["start"] for e in controls],
            "control_guidance_end": controls[0]["end"] if one else [e["end"] for e in controls],
        }
    else:
        kwargs = {"adapter_conditioning_scale": scales[0] if one else scales}
    return ControlCall(cls, kwargs)


# --- control images -----------------------------------------------------------------------------


def canny(image: Any, low: float, high: float) -> Any:
    """Canny's edge detector (as OpenCV's `Canny(img, low, high)`, L1 gradient, no blur, which is
    what the ControlNet canny annotator runs): Sobel gradients, non-maximum suppression along the
    gradient direction, then hysteresis (weak edges kept where they touch strong ones). Returns
    an RGB image, white edges on black."""
    import numpy as np
    from PIL import Image

    gray = np.asarray(image.convert("L"), dtype=np.float32)
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    magnitude = np.abs(gx) + np.abs(gy)
    # Gradient direction in four sectors: 0 (horizontal gradient), 45, 90, 135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (((angle + 22.5) // 45) % 4).astype(np.int8)
    m = np.pad(magnitude, 1)
    h, w = magnitude.shape
    neighbours = {  # (dy, dx) of the two neighbours along each sector's gradient
        0: (0, 1),
        1: (1, 1),
        2: (1, 0),
        3: (1, -1),
    }
    keep = np.zeros_like(magnitude, dtype=bool)
    for s, (dy, dx) in neighbours.items():
        ahead = m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = m[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (sector == s) & (magnitude > ahead) & (magnitude >= behind)
    thin = np.where(keep, magnitude, 0.0)
    strong, weak = thin >= high, thin >= low
    edges = strong
    while True:  # grow strong edges into touching weak pixels until nothing changes
        g = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= g[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        grown &= weak
        if (grown == edges).all():
            break
        edges = grown
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out, out, out], axis=-1), "RGB")


def control_image(
    entry: Mapping[str, Any], width: int, height: int, settings: Settings, read: Reader | None = None
) -> Any:
    """One control image, read through `read` (the worker's object store; see load_init_image),
    fitted to the job's size and preprocessed."""
    try:
        image = load_init_image(entry["image"], width, height, settings, read, what=f"control image ({entry['name']})")
    except ControlImageError:
        raise
    except InitImageError as exc:
        raise ControlImageError(str(exc)) from exc
    if entry.get("preprocess") == "canny":
        image = canny(image, entry["low"], entry["high"])
    return image


def pixels_sha256(image: Any) -> str:
    """The sha256 of an RGB image's pixels as rendered from (width x height x 3 bytes, row by
    row): what the manifest records of a control image after fitting and preprocessing."""
    import hashlib

    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def load_control_images(
    jobs: Sequence[JobRecord], settings: Settings, read: Reader | None = None
) -> tuple[list[JobRecord], list[list[Any]] | None, list[tuple[JobRecord, str]]]:
    """(jobs that can render, each one's control images in its set's order or None without
    controls, (job, reason) of bad ones). A micro-batch shares one control set (render shape)."""
    if not jobs or not jobs[0].control:
        return list(jobs), None, []
    ready, images, bad = [], [], []
    cache: dict[str, tuple[Any, str]] = {}  # a catalog's items often share a control image: processed once
    for job in jobs:
        try:
            assert job.control is not None
            mine, entries = [], []
            for entry in job.control:
                key = json.dumps(
                    [
                        entry["image"],
                        entry.get("preprocess"),
                        entry.get("low"),
                        entry.get("high"),
                        job.width,
                        job.height,
                    ]
                )
                if key not in cache:
                    image = control_image(entry, job.width, job.height, settings, read)
                    cache[key] = (image, pixels_sha256(image))
                mine.append(cache[key][0])
                entries.append(dict(entry) | {"sha256": cache[key][1]})
            ready.append(replace(job, control=entries))  # recorded with the job (the manifest's)
            images.append(mine)
        except InitImageError as exc:
            bad.append((job, f"ControlImageError: {exc}"))
    return ready, images, bad


# --- the models -----------------------------------------------------------------------------------


def _model_key(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return (entry["type"], entry["model"], entry.get("config") or "")


def _config_class(entry: Mapping[str, Any]) -> str | None:
    """The `_class_name` of the model's config (None for a single file without a config)."""
    from diffusers import ControlNetModel

    ref = entry.get("config") or entry["model"]
    if entry["model"].endswith(SINGLE_FILE_SUFFIXES) and not entry.get("config"):
        return None
    try:
        return ControlNetModel.load_config(ref).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ControlLoadError(f"control model {entry['name']} ({ref}): no readable config.json: {exc}") from exc


def load_model(entry: Mapping[str, Any], dtype: Any) -> Any:
    """A ControlNetModel or T2IAdapter, as the entry's type says and its config confirms."""
    import diffusers

    model, config = entry["model"], entry.get("config")
    if model.startswith("s3://"):
        raise ControlLoadError(f"control model {entry['name']} ({model}): s3:// control models are not supported yet")
    class_name = _config_class(entry)
    if class_name is not None and MODEL_CLASSES.get(class_name) != entry["type"]:
        raise ControlLoadError(
            f"control model {entry['name']} ({model}) is a {class_name}, but the job says {entry['type']}"
        )
    try:
        if model.endswith(SINGLE_FILE_SUFFIXES):
            if entry["type"] != CONTROLNET:
                raise ControlLoadError(f"control model {entry['name']}: a single file must be a ControlNet")
            local = config is not None and Path(config).is_dir()
            return diffusers.ControlNetModel.from_single_file(
                model, config=config, local_files_only=local, torch_dtype=dtype
            )
        cls = diffusers.ControlNetModel if entry["type"] == CONTROLNET else diffusers.T2IAdapter
        return cls.from_pretrained(model, torch_dtype=dtype)
    except ControlLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is this model's fault
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ControlLoadError(
            f"control model {entry['name']} ({model}) cannot be loaded: {type(exc).__name__}: {first}"
        ) from exc


class ControlCache:
    """The control models of one pipeline, least recently used first, at most `capacity`
    (a set larger than that is loaded whole: it is one call's need). Callers hold `lock`."""

    def __init__(self, pipe: Any, capacity: int, device: str, dtype: Any):
        self.pipe = pipe
        self.capacity = max(1, capacity)
        self.device, self.dtype = device, dtype
        self.loaded: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self.lock = threading.Lock()
        self._built: tuple[tuple, Any] | None = None  # the last pipeline: (its key, it)

    def models(self, controls: Sequence[Mapping[str, Any]]) -> list[Any]:
        wanted = [_model_key(entry) for entry in controls]
        missing = [(key, entry) for key, entry in zip(wanted, controls, strict=True) if key not in self.loaded]
        while self.loaded and len(self.loaded) + len(missing) > self.capacity and set(self.loaded) - set(wanted):
            victim = next(key for key in self.loaded if key not in wanted)
            del self.loaded[victim]
            self._built = None  # it may hold the victim
            log.info("control model evicted", extra={"model": victim[1], "loaded": len(self.loaded)})
        for key, entry in missing:
            module = load_model(entry, self.dtype).to(self.device)
            module.eval()
            self.loaded[key] = module
            log.info(
                "control model loaded",
                extra={"model": entry["model"], "kind": entry["type"], "loaded": len(self.loaded)},
            )
        for key in wanted:
            self.loaded.move_to_end(key)
        return [self.loaded[key] for key in wanted]

    def pipeline(self, call: ControlCall, controls: Sequence[Mapping[str, Any]]) -> Any:
        """The pipeline of this class over the pinned components and these control models."""
        import diffusers

        key = (call.pipeline_class, tuple(_model_key(entry) for entry in controls))
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        models = self.models(controls)
        cls = getattr(diffusers, call.pipeline_class)
        part = "controlnet" if controls[0]["type"] == CONTROLNET else "adapter"
        # vae= named: from_pipe would drop an AutoencoderTiny (vae_decoder = "tiny"), a class
        # the control pipelines' signatures do not list.
        extra: dict[str, Any] = {part: models[0] if len(models) == 1 else models, "vae": self.pipe.vae}
        if part == "adapter" and len(models) > 1:
            extra[part] = diffusers.MultiAdapter(models)
        built = cls.from_pipe(self.pipe, **extra)
        built.set_progress_bar_config(disable=True)
        self._built = (key, built)
        return built


_CACHES: dict[int, ControlCache] = {}
_CACHES_LOCK = threading.Lock()


def control_cache(pipe: Any, settings: Settings, device: str, dtype: Any) -> ControlCache:
    """The control models of this process's pipeline."""
    with _CACHES_LOCK:
        cache = _CACHES.get(id(pipe))
        if cache is None or cache.pipe is not pipe:
            cache = _CACHES[id(pipe)] = ControlCache(pipe, settings.control_cache_size, device, dtype)
        return cache


def call_images(control_images: Sequence[Sequence[Any]], kind: str) -> Any:
    """Per-job lists of control images as the pipeline takes them: one list over the jobs for a
    single control. For several: MultiAdapter takes one list over the jobs per adapter; the
    multi-ControlNet pipelines differ in what lists of lists mean (SDXL's and img2img's refuse
    them), but all take one batched tensor (jobs x RGB x H x W, 0..1) per ControlNet."""
    count = len(control_images[0])
    per_control = [[images[i] for images in control_images] for i in range(count)]
    if count == 1 or kind != CONTROLNET:
        return per_control[0] if count == 1 else per_control
    import numpy as np
    import torch

    return [
        torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])).permute(
            0, 3, 1, 2
        )
        for images in per_control
    ]
