"""The pinned pipeline: one per worker process, loaded once, kept for the process's life.

Every profile, the generated `tiny` and `tiny-xl` included, loads through the same steps real
models take: `from_pretrained` (or `from_single_file` with the profile's config folder), with the
profile's replacement VAE if it names one (an AutoencoderKL, or with `vae_decoder = "tiny"` the
AutoencoderTiny of `tiny_vae`, in place of the whole VAE), `LCMScheduler.from_config`, `load_lora_weights`,
`fuse_lora`, then the profile's memory modes. `plan_load` decides all of it without torch, so the
wiring is testable without loading anything.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lcmq.errors import LcmqError, ModelLoadError, ProfileError
from lcmq.loras import LCM_ADAPTER
from lcmq.modelpack import is_remote
from lcmq.profiles import FAMILY_PIPELINE_CLASS, GENERATED_PREFIX, NULL_FAMILY, Profile, preflight, resolve_dtype
from lcmq.settings import Settings

if TYPE_CHECKING:
    from worker.model_fetch import ObjectSource

log = logging.getLogger("lcmq.worker")


@dataclass
class LoadedPipeline:
    profile: Profile
    pipe: Any
    device: str
    dtype: Any
    load_s: float
    # The images per pipeline call this process uses: settings.batch_size, or less when
    # --max-memory made the load probe a smaller one (worker/memory.py).
    batch_size: int | None = None
    # s3:// models (worker/model_fetch.py): "hit", "miss" or "partial"; None when there is none.
    model_cache: str | None = None
    fetch_s: float | None = None  # seconds of load_s spent reading manifests and downloading
    # "torch", or "openvino[-bf16]" when the networks run as OpenVINO exports (worker/openvino_runtime.py).
    runtime: str = "torch"
    # --max-memory found that micro-batches above this size fit only when the VAE decodes one
    # image at a time (worker/memory.py); None: never needed (or the profile slices always).
    vae_slicing_above: int | None = None


DEVICES = ("cpu", "cuda", "mps")


def _refuse_missing(requested: str, cuda_available: bool) -> None:
    import torch

    mps = getattr(torch.backends, "mps", None)
    if requested not in DEVICES:
        raise ModelLoadError(f"unknown device {requested!r}; use auto, {', '.join(DEVICES)}")
    if requested == "cuda" and not cuda_available:
        raise ModelLoadError("device 'cuda' requested but CUDA is not available on this machine")
    if requested == "mps" and not (mps and mps.is_available()):
        raise ModelLoadError("device 'mps' requested but Metal (MPS) is not available on this machine")


def check_device(requested: str) -> None:
    """At start, before consuming: refuse a device this machine lacks (ModelLoadError).

    Runs in the prefork parent, so it counts GPUs through NVML (`torch.cuda.device_count`),
    never `cuInit`: a parent that initialised CUDA leaves the children it forks unable to use it.
    """
    if requested in ("auto", "cpu"):
        return
    import torch

    _refuse_missing(requested, torch.cuda.device_count() > 0)


def pick_device(requested: str) -> str:
    import torch

    mps = getattr(torch.backends, "mps", None)
    if requested != "auto":
        _refuse_missing(requested, torch.cuda.is_available())
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if mps and mps.is_available():
        return "mps"
    return "cpu"


@dataclass(frozen=True)
class LoadPlan:
    """What loading a profile on a device will do, decided without torch or downloads."""

    pipeline_class: str  # the diffusers class, by family (profiles.FAMILY_PIPELINE_CLASS)
    base: str
    single_file: bool  # from_single_file(base, config=config) instead of from_pretrained(base)
    config: str | None
    vae: str | None  # AutoencoderKL.from_pretrained(vae), passed to the pipeline as `vae=`
    lcm_lora: str
    dtype: str  # a torch dtype name
    device: str
    cpu_offload: bool  # enable_model_cpu_offload instead of .to(device)
    memory_modes: tuple[str, ...]  # attention_slicing, vae_slicing, vae_tiling as the profile asks
    warnings: tuple[str, ...] = ()
    # vae_decoder = "tiny": AutoencoderTiny.from_pretrained(tiny_vae) as the pipeline's `vae=`
    # (encoder and decoder; the base's AutoencoderKL is not loaded). None: the full VAE.
    tiny_vae: str | None = None


def plan_load(profile: Profile, device: str) -> LoadPlan:
    """The load of a profile on a resolved device; ModelLoadError when it cannot work there."""
    try:
        preflight(profile, device)  # float16 on the CPU device is refused here
    except LcmqError as exc:
        raise ModelLoadError(str(exc)) from exc
    warnings = []
    cpu_offload = profile.cpu_offload
    if cpu_offload and device != "cuda":
        # Offload moves components between the GPU and host memory; on the CPU they are in host
        # memory already, and MPS shares memory with the host. One lcmq.toml serves every worker,
        # so this is not an error: the option is ignored where it means nothing.
        warnings.append(f"cpu_offload ignored on device {device!r} (it only applies to cuda)")
        cpu_offload = False
    modes = tuple(mode for mode in ("attention_slicing", "vae_slicing", "vae_tiling") if getattr(profile, mode))
    return LoadPlan(
        pipeline_class=FAMILY_PIPELINE_CLASS[profile.family],
        base=profile.base,
        single_file=profile.single_file,
        config=profile.config,
        vae=profile.vae,
        lcm_lora=profile.lcm_lora,
        dtype=resolve_dtype(profile.dtype, device),
        device=device,
        cpu_offload=cpu_offload,
        memory_modes=modes,
        warnings=tuple(warnings),
        tiny_vae=profile.tiny_vae if profile.vae_decoder == "tiny" else None,
    )


REMOTE_FIELDS = ("base", "config", "vae", "tiny_vae", "lcm_lora")  # the plan's fields that may name s3:// models


def fetch_remote(
    plan: LoadPlan, settings: Settings, source: ObjectSource | None = None
) -> tuple[LoadPlan, str | None, float | None]:
    """The plan with each s3:// model replaced by its verified local copy, the cache outcome
    ("hit", "miss", "partial"; None without s3:// models) and the seconds it took.

    A model that cannot be used (no manifest, a file that does not match it) is a
    ModelLoadError naming the field and the file; a store that is away stays a StorageError
    (transient: the next task tries the load again)."""
    remote = {field: getattr(plan, field) for field in REMOTE_FIELDS if is_remote(getattr(plan, field))}
    if not remote:
        return plan, None, None
    from worker.model_fetch import S3Source, cache_summary, fetch_model

    source = source or S3Source(settings)
    fetched = {}
    for field, url in remote.items():
        try:
            fetched[field] = fetch_model(url, settings.models_path, source)
        except ProfileError as exc:
            raise ModelLoadError(f"{field}: {exc}") from exc
    paths: dict[str, Any] = {field: str(f.path) for field, f in fetched.items()}
    local = replace(plan, **paths)
    return local, cache_summary(fetched.values()), round(sum(f.seconds for f in fetched.values()), 3)


def _resolve(ref: str, settings: Settings) -> str:
    """A generated ref (`lcmq-generated:<model>[-lcm-lora|-vae|-taesd]`) becomes its folder, built on first use."""
    if ref.startswith(GENERATED_PREFIX):
        from worker.generated import TINY_VAE_SUFFIX, ensure_generated, ensure_tiny_vae

        name = ref[len(GENERATED_PREFIX) :]
        if name.endswith(TINY_VAE_SUFFIX):
            return str(ensure_tiny_vae(name.removesuffix(TINY_VAE_SUFFIX), settings.models_path))
        for suffix, part in (("-lcm-lora", "lora"), ("-vae", "vae")):
            if name.endswith(suffix):
                model_dir, lora_dir = ensure_generated(name.removesuffix(suffix), settings.models_path)
                return str(lora_dir if part == "lora" else model_dir.parent / "vae")
        return str(ensure_generated(name, settings.models_path)[0])
    return ref


def load_vae(plan: LoadPlan, settings: Settings, dtype) -> Any:
    """The VAE the plan puts in place of the base's own: the tiny one (AutoencoderTiny), a
    replacement AutoencoderKL, or None (the base's own, loaded with it)."""
    import diffusers

    if plan.tiny_vae:
        return diffusers.AutoencoderTiny.from_pretrained(_resolve(plan.tiny_vae, settings), dtype=dtype)
    if plan.vae:
        return diffusers.AutoencoderKL.from_pretrained(_resolve(plan.vae, settings), dtype=dtype)
    return None


def _load_base(plan: LoadPlan, settings: Settings, dtype, extra: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, plan.pipeline_class)
    vae = load_vae(plan, settings, dtype)
    if vae is not None:
        extra["vae"] = vae
    base = _resolve(plan.base, settings)
    if plan.single_file:
        # The config folder gives the architecture and the tokenizers; local_files_only keeps
        # diffusers from fetching configs from the hub (a hub id as config may still download).
        assert plan.config is not None  # the plan refuses a single file without its config
        config = _resolve(plan.config, settings)
        return cls.from_single_file(base, config=config, local_files_only=Path(config).is_dir(), dtype=dtype, **extra)
    return cls.from_pretrained(base, dtype=dtype, **extra)


def _place(pipe, plan: LoadPlan) -> None:
    """Memory modes, then the device: offloaded (components visit the GPU in turn) or moved whole."""
    import torch

    for warning in plan.warnings:
        log.warning("profile option ignored", extra={"warning": warning, "device": plan.device})
    if "attention_slicing" in plan.memory_modes:
        pipe.enable_attention_slicing()
    if "vae_slicing" in plan.memory_modes:
        pipe.vae.enable_slicing()  # decode a batch one image at a time
    if "vae_tiling" in plan.memory_modes:
        pipe.vae.enable_tiling()  # decode large images in overlapping tiles
    if plan.cpu_offload:
        # After fuse_lora: loading a LoRA into an offloaded pipeline can silently switch it to
        # sequential offload (diffusers #10914), ~15x slower.
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
        if plan.device != "cpu":
            pipe.unet.to(memory_format=torch.channels_last)


def _load_lora(pipe, ref: str) -> None:
    path = Path(ref)
    kwargs: dict[str, Any] = {"adapter_name": LCM_ADAPTER, "low_cpu_mem_usage": True}
    if path.is_file():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    else:
        pipe.load_lora_weights(ref, **kwargs)


def _fuse_profile_loras(pipe, profile: Profile, settings: Settings) -> None:
    """The profile's style LoRAs, at their weights, merged into the weights and their adapter
    layers dropped: an export holds them, as it holds the LCM-LoRA (jobs may not change them)."""
    if not profile.loras:
        return
    from worker.adapters import adapter_cache

    cache = adapter_cache(pipe, settings)
    cache.activate(profile.loras)
    pipe.fuse_lora(adapter_names=cache.style_adapters())
    pipe.unload_lora_weights()


def quiet_libraries() -> None:
    """Loading bars and hub warnings are noise in a worker's log; lcmq logs the load itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def share_cpus(torch, settings: Settings) -> None:
    """Take this process's share of the host's cores for torch (worker/threads.py), and say so."""
    from worker.threads import plan_threads

    plan = plan_threads(settings.models_path, settings.torch_threads)
    torch.set_num_threads(plan.threads)
    try:
        # Inter-op threads only serve parallel graph branches (TorchScript); eager diffusers
        # runs its ops one by one. Settable once, before any parallel work: else left as is.
        torch.set_num_interop_threads(plan.threads)
    except RuntimeError:
        pass
    log.info(
        "torch threads",
        extra={
            "threads": plan.threads,
            "cores": plan.cores,
            "processes": plan.processes,
            "source": plan.source,
            "pid": os.getpid(),
        },
    )


def load_pipeline(profile: Profile, settings: Settings, source: ObjectSource | None = None) -> LoadedPipeline:
    """Fetch s3:// models, load, swap the scheduler, load and fuse the LCM-LoRA, apply the memory
    modes, and with a memory budget probe the batch size; ModelLoadError on any failure.

    `source` reads s3:// models (default: this process's S3 credentials); an edge worker passes
    a GatewaySource, which downloads through presigned GETs (worker/gateway_models.py)."""
    if profile.family == NULL_FAMILY:
        from worker.null_render import NullPipeline

        return LoadedPipeline(profile, NullPipeline.from_settings(settings), "cpu", None, 0.0)
    import torch
    from diffusers import LCMScheduler

    quiet_libraries()
    started = time.perf_counter()
    device = pick_device(settings.device)
    plan = plan_load(profile, device)
    dtype = getattr(torch, plan.dtype)
    if device == "cpu":
        share_cpus(torch, settings)
    try:
        # 0. s3:// models: downloaded once per host into the models dir, verified, then local.
        plan, model_cache, fetch_s = fetch_remote(plan, settings, source)
    except ModelLoadError as exc:
        raise ModelLoadError(f"profile {profile.name!r}: {exc}") from exc
    try:
        # 1. Base model: a diffusers folder / hub id, or a single-file checkpoint (+ its config),
        #    with the plan's VAE in place of its own (a tiny one: the base's is never loaded).
        extra = {"safety_checker": None, "requires_safety_checker": False} if profile.family == "sd15" else {}
        pipe = _load_base(plan, settings, dtype, extra)
        # 2. The LCM scheduler, configured from the model's own scheduler.
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        # 3. The LCM-LoRA, fused into the weights: no per-step adapter cost.
        _load_lora(pipe, _resolve(plan.lcm_lora, settings))
        pipe.fuse_lora(adapter_names=[LCM_ADAPTER])
        # 4. Memory modes and the device.
        _place(pipe, plan)
        pipe.set_progress_bar_config(disable=True)
        # 5. OpenVINO: the profile's style LoRAs fused too, then the networks exported (once per
        #    models dir and library versions), compiled and swapped in (worker/openvino_runtime.py).
        if profile.runtime != "torch":
            _fuse_profile_loras(pipe, profile, settings)
            from worker.openvino_runtime import use_openvino

            try:
                import openvino  # noqa: F401
            except ImportError:
                raise ModelLoadError(
                    f"profile {profile.name!r}: runtime {profile.runtime} needs the openvino package "
                    "(pip install 'lcmq[openvino]')"
                ) from None
            use_openvino(pipe, profile, settings.models_path, torch.get_num_threads())
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"profile {profile.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    load_s = time.perf_counter() - started
    log.info(
        "pipeline loaded",
        extra={
            "profile": profile.name,
            "device": device,
            "dtype": str(dtype),
            "pipeline": plan.pipeline_class,
            "single_file": plan.single_file,
            "vae": plan.vae,
            "tiny_vae": plan.tiny_vae,
            "memory_modes": ",".join(plan.memory_modes) or None,
            "cpu_offload": plan.cpu_offload,
            "runtime": profile.runtime,
            "model_cache": model_cache,
            "fetch_s": fetch_s,
            "load_s": round(load_s, 2),
            "pid": os.getpid(),
        },
    )
    loaded = LoadedPipeline(
        profile, pipe, device, dtype, load_s, model_cache=model_cache, fetch_s=fetch_s, runtime=profile.runtime
    )
    if settings.max_memory_mb:
        from worker.memory import probe_batch_size

        try:
            loaded.batch_size = probe_batch_size(loaded, settings.max_memory_mb, settings.batch_size)
        except Exception as exc:
            raise ModelLoadError(f"profile {profile.name!r}: memory probe failed: {type(exc).__name__}: {exc}") from exc
    return loaded


def truncation_warnings(loaded: LoadedPipeline, prompts: list[str]) -> list[str | None]:
    """A warning per prompt longer than the text encoder reads (the pipeline truncates it)."""
    tokenizer = loaded.pipe.tokenizer
    if tokenizer is None:
        return [None] * len(prompts)
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
    warnings = [f"prompt truncated to {limit} tokens (had {n})" if n > limit else None for n in lengths]
    for prompt, warning in zip(prompts, warnings, strict=False):
        if warning:
            log.warning("prompt truncated", extra={"tokens_limit": limit, "prompt_chars": len(prompt)})
    return warnings


_PINNED: dict[str, LoadedPipeline] = {}
_PIN_LOCK = threading.Lock()


def pinned_pipeline(profile: Profile, settings: Settings, source: ObjectSource | None = None) -> LoadedPipeline:
    """This process's pipeline for the profile, loaded on first use and never again. `source`
    reads its s3:// models (None: this process's S3 credentials; an edge worker's GatewaySource).

    The lock makes a task that arrives while `preload` is still loading wait for that load
    instead of starting a second one.
    """
    with _PIN_LOCK:
        loaded = _PINNED.get(profile.name)
        if loaded is None:
            loaded = _PINNED[profile.name] = load_pipeline(profile, settings, source)
        return loaded


def loaded_pipeline(profile_name: str) -> LoadedPipeline | None:
    """This process's pipeline for the profile once loaded; None while loading (never waits)."""
    return _PINNED.get(profile_name)


def preload(profile: Profile, settings: Settings, source: ObjectSource | None = None) -> threading.Thread:
    """Load the pipeline in the background as soon as a worker process starts.

    Celery kills process-init handlers after 4 s, so the load runs in a thread; the first task
    waits for it through the lock. A failed load is logged here and raised again by that task.
    """

    def load():
        try:
            pinned_pipeline(profile, settings, source)
        except Exception as exc:  # noqa: BLE001 - the first task reports it against its jobs
            log.error("pipeline preload failed", extra={"profile": profile.name, "error": str(exc)})

    thread = threading.Thread(target=load, name="lcmq-preload", daemon=True)
    thread.start()
    return thread
