"""GPU throughput: SD1.5 512² and SDXL 1024², 4 LCM steps, bare pipeline vs the lcmq worker loop.

On the lent GPU machine (one H100/H200), from the repository root, with the wheels below in .whl/:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && python3 bench/gpu.py --out $OUT/gpu.json

About 3-4 minutes on an H100 after imports (`--quick`: under 2), machine start not counted.
The machine's image has torch, transformers, peft, accelerate, safetensors, pillow, huggingface-hub,
tokenizers, click and python-dateutil. It lacks diffusers, and importing the worker modules imports
the lcmq package (SQLAlchemy, pydantic-settings, celery). The wheels (16, 15 MB), fetched here into
.whl/ (git-ignored) for CPython 3.12 x86-64, at the versions the CPU smoke test ran with:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 sqlalchemy==2.1.9 pydantic==2.14.4 pydantic-core==2.50.5 \
        pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0 celery==5.7.0 kombu==5.7.0 amqp==5.4.2 billiard==4.3.2 vine==5.1.0 \
        redis==8.1.0 tzlocal==5.4.5

The script looks for every module it needs before it starts and names all the missing ones at
once (exit 3). Without a CUDA device it says so and exits 2.

No model is downloaded or saved: every model is built in memory from the real diffusers
and transformers classes with random weights, directly on the GPU, in fp16:

- sd15-512: the SD1.5 architecture (worker.generated's `sd15-arch`: 860M UNet, VAE, CLIP ViT-L text
  encoder), 512x512.
- sdxl-1024: the SDXL base architecture (2.6B UNet with SDXL's published config, SDXL VAE, CLIP ViT-L
  and OpenCLIP bigG text encoders), 1024x1024. The VAE keeps SDXL base's `force_upcast=True`, so the
  pipeline decodes in fp32 as the `sdxl` profile does with stabilityai/stable-diffusion-xl-base-1.0;
  `--fp16-vae` models madebyollin/sdxl-vae-fp16-fix instead (same architecture, decodes in fp16).

Each gets a random LCM-LoRA of the real ones' rank (64) and target modules, loaded with
`load_lora_weights` and fused, after the scheduler is swapped for LCMScheduler: the steps
worker.pipeline.load_pipeline takes. Random weights run at the speed of real ones; their images are
not real images, so PNG encoding need not cost what it does for real ones.

TFLOP per image, for the FLOP-ceiling share: SD1.5 512² 5.9, SDXL 1024² 37.8, each covering 4 UNet
steps + VAE decode + text encoder(s) at guidance 1 (no CFG: one UNet pass per step). torch's FLOP
counter gives 5.74 and 37.6 on these architectures; each run prints its own count as well.

Procedure:
1. Dense matmul ceiling: bf16 8192x8192 products timed with CUDA events -> TFLOP/s.
2. Per config: build, LoRA load + fuse, channels_last UNet, one batch-1 call under a FLOP counter.
3. Per batch size (1, 4, 8, 16), two loops, each timed for ~5 s (`--quick`: ~1.5 s):
   a. bare: `pipe(...)` with a CPU generator per image, as worker.render seeds them, then PNG
      encoding of each image, as bench/overhead.py's bare loop; warmed up 2 iterations. img_s
      counts the pipeline call alone: tflop_share = img_s x TFLOP per image / matmul TFLOP/s;
   b. lcmq: whole render tasks of lcmq's chunk_size jobs (32 by default) run by the worker's own
      code, worker.tasks.ChunkRun, around this pipeline, with the database and object store in
      memory: claim, micro-batches, truncation warnings, worker.render.render, then PNG encoding
      with the job's parameters, sha256 and upload in the background while the next micro-batch
      renders, recording. lcmq_ratio = lcmq img/s / bare (pipeline + PNG) img/s; lcmq_vs_pipe =
      lcmq img/s / img_s. Warmed by one single-micro-batch task (the pipeline is already warm).
4. One line per config and batch size (`config=sd15-512 batch=8 img_s=… tflop_share=… lcmq_ratio=…`,
   then the parts); last line `sd15_512_img_s=… sdxl_1024_img_s=… matmul_tflops=…` (best of the
   batch sizes), then the best lcmq img/s per config. --out writes all of it as JSON, after every
   batch size, so a run cut short keeps what it measured. A batch size that runs out of GPU
   memory is reported as `error=OOM` and the run goes on.

    python3 bench/gpu.py [--quick] [--out FILE] [--compile] [--fp16-vae] [--config sd15-512] \
        [--batch-sizes 1,4] [--chunk-size 32]
    python3 bench/gpu.py --cpu-smoke     # the whole code path on CPU: tiny models of both, 64x64, fp32

--compile applies torch.compile(mode="max-autotune-no-cudagraphs") to the UNet; autotuning takes
minutes per batch size, more than a 15-minute device lease holds for all eight shapes.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_NO_CUDA = 2
EXIT_MISSING_MODULES = 3

STEPS = 4
GUIDANCE = 1.0  # LCM: no classifier-free guidance, one UNet pass per step
BATCH_SIZES = (1, 4, 8, 16)
WARMUP_ITERS = 2
TARGET_S = 5.0
QUICK_TARGET_S = 1.5
MIN_ITERS = 3
MAX_ITERS = 500
MATMUL_N = 8192
PROMPT = "a lighthouse on a cliff at dusk, waves breaking, oil painting"
BARE_PARAMETERS = f"{PROMPT}\nSteps: {STEPS}, Sampler: LCM, CFG scale: {GUIDANCE:g}"
FLOP_SCOPE = f"{STEPS} UNet steps + VAE decode + text encoder(s), guidance {GUIDANCE:g} (no CFG)"

# The modules targeted by diffusers' LCM-LoRA distillation scripts (train_lcm_distill_lora_*),
# which trained latent-consistency/lcm-lora-sdv1-5 and lcm-lora-sdxl (both rank 64).
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
LCM_LORA_RANK = 64

# Top-level module -> distribution, for everything the worker's import chain needs.
REQUIRED_MODULES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "sqlalchemy": "sqlalchemy",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "celery": "celery",
    "kombu": "kombu",
    "amqp": "amqp",
    "billiard": "billiard",
    "vine": "vine",
    "redis": "redis",
    "tzlocal": "tzlocal",
    "dateutil": "python-dateutil",
    "click": "click",
}

# SDXL base 1.0's published UNet config (unet/config.json), less the defaults.
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
# The same topology, narrow and shallow, for --cpu-smoke: cross_attention_dim = the two encoders'
# hidden sizes, projection input = 6 time ids x addition_time_embed_dim + encoder 2's projection.
SDXL_SMOKE_UNET = SDXL_UNET | dict(
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    sample_size=8,
)
SDXL_TEXT_ENCODERS = (
    dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        hidden_act="gelu",
        projection_dim=1280,
    ),
)
SDXL_SMOKE_TEXT_ENCODERS = (
    dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
    dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
)


@dataclass(frozen=True)
class Config:
    name: str
    profile: str  # the lcmq built-in profile whose family and defaults it stands for
    family: str
    size_px: int
    unet: dict[str, Any]
    vae_channels: tuple[int, ...]
    text_encoders: tuple[dict[str, Any], ...]
    lora_rank: int
    tflop_per_image: float | None  # None: use the counted value (smoke models)

    def summary_key(self, measure: str) -> str:
        return f"{self.name.replace('-', '_')}_{measure}"


def gpu_configs() -> list[Config]:
    from worker.generated import ARCHITECTURES

    sd15_unet, sd15_vae, sd15_text, _ = ARCHITECTURES["sd15-arch"]
    return [
        Config("sd15-512", "sd15", "sd15", 512, sd15_unet, sd15_vae, (sd15_text,), LCM_LORA_RANK, 5.9),
        Config(
            "sdxl-1024", "sdxl", "sdxl", 1024, SDXL_UNET, (128, 256, 512, 512), SDXL_TEXT_ENCODERS, LCM_LORA_RANK, 37.8
        ),
    ]


def smoke_configs() -> list[Config]:
    from worker.generated import ARCHITECTURES

    tiny_unet, tiny_vae, tiny_text, tiny_rank = ARCHITECTURES["tiny-sd15"]
    return [
        Config("sd15-64-smoke", "sd15", "sd15", 64, tiny_unet, tiny_vae, (tiny_text,), tiny_rank, None),
        Config(
            "sdxl-64-smoke", "sdxl", "sdxl", 64, SDXL_SMOKE_UNET, (32, 32, 64, 64), SDXL_SMOKE_TEXT_ENCODERS, 4, None
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Environment


def missing_modules() -> list[str]:
    def present(module: str) -> bool:
        if module in sys.modules:
            return True
        return importlib.util.find_spec(module) is not None

    return sorted({dist for module, dist in REQUIRED_MODULES.items() if not present(module)})


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "card": torch.cuda.get_device_name(0),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        info |= {"card": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    return info


def set_backends() -> None:
    """TF32 for what still runs in fp32 (SDXL base's upcast VAE decode); SDPA is diffusers' default."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# 1. The dense matmul ceiling


def matmul_tflops(device: str, quick: bool) -> dict[str, Any]:
    """Median TFLOP/s of n x n x n products: bf16 on the GPU (CUDA events), fp32 on CPU (smoke)."""
    import torch

    n = MATMUL_N if device == "cuda" else 512
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # never zeros: they run faster
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    per_trial, trials = 10, (5 if quick else 20)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    synchronize(device)
    times_s = []
    for _ in range(trials):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_trial):
                torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times_s.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            for _ in range(per_trial):
                torch.matmul(a, b, out=out)
            times_s.append(time.perf_counter() - started)
    median_s = statistics.median(times_s)
    tflops = 2 * n**3 * per_trial / median_s / 1e12
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "trials": trials,
        "tflops": tflops,
        "spread": (max(times_s) - min(times_s)) / median_s,
    }


# ---------------------------------------------------------------------------------------------
# 2. Building the pipelines: real classes, random weights, on the device


def _on_device(build: Callable[[], Any], device: str, dtype, seed: int):
    """Construct a module with its weights allocated (and randomly initialised) on the device."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        module = build()
    return module.to(dtype=dtype).eval().requires_grad_(False)


def _text_encoder(kwargs: dict[str, Any], vocab_size: int, with_projection: bool, device: str, dtype, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77, **kwargs
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _on_device(lambda: cls(config), device, dtype, seed)


def _vae(config: Config, device: str, dtype, fp16_vae: bool):
    from diffusers import AutoencoderKL

    extra: dict[str, Any] = {}
    if config.family == "sdxl":
        # SDXL base's VAE overflows in fp16, so its config asks the pipeline to decode in fp32.
        extra = {"scaling_factor": 0.13025, "force_upcast": not fp16_vae}
    n = len(config.vae_channels)
    return _on_device(
        lambda: AutoencoderKL(
            block_out_channels=config.vae_channels,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=config.size_px,
            **extra,
        ),
        device,
        dtype,
        seed=1,
    )


def build_pipeline(config: Config, device: str, dtype, fp16_vae: bool):
    """The family's diffusers pipeline with its original scheduler, as from_pretrained gives it."""
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from worker.generated import byte_level_tokenizer

    unet = _on_device(lambda: UNet2DConditionModel(in_channels=4, out_channels=4, **config.unet), device, dtype, seed=0)
    vae = _vae(config, device, dtype, fp16_vae)
    betas = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    tokenizer = byte_level_tokenizer()
    if config.family == "sd15":
        text_encoder = _text_encoder(config.text_encoders[0], len(tokenizer), False, device, dtype, seed=2)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler(skip_prk_steps=True, **betas),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tokenizer_2 = byte_level_tokenizer()
    text_encoder = _text_encoder(config.text_encoders[0], len(tokenizer), False, device, dtype, seed=2)
    text_encoder_2 = _text_encoder(config.text_encoders[1], len(tokenizer_2), True, device, dtype, seed=4)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **betas),
        add_watermarker=False,
    )


def random_lcm_lora(unet, rank: int, device: str, dtype) -> dict[str, Any]:
    """A PEFT-format LoRA state dict (`unet.<module>.lora_A/B.weight`) over the LCM-LoRA targets.

    Built in memory, on the device, instead of being saved: load_lora_weights takes a state dict.
    B is small but not zero, so fusing really changes the weights.
    """
    import torch

    gen = torch.Generator(device).manual_seed(3)
    state: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if not any(name == target or name.endswith("." + target) for target in LCM_LORA_TARGETS):
            continue
        if isinstance(module, torch.nn.Linear):
            a_shape, b_shape = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            a_shape, b_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            continue
        a = torch.randn(a_shape, generator=gen, device=device, dtype=dtype) / math.prod(a_shape[1:]) ** 0.5
        b = torch.randn(b_shape, generator=gen, device=device, dtype=dtype) * 1e-3
        state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = a, b
    return state


def prepare(pipe, config: Config, device: str, dtype) -> dict[str, Any]:
    """load_pipeline's steps 2 and 3 on an in-memory pipeline: LCM scheduler, LCM-LoRA fused."""
    import torch
    from diffusers import LCMScheduler

    from lcmq.loras import LCM_ADAPTER

    # 2. The LCM scheduler, configured from the model's own scheduler.
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    # 3. The LCM-LoRA, fused into the weights.
    lora = random_lcm_lora(pipe.unet, config.lora_rank, device, dtype)
    lora_modules, lora_params = len(lora) // 2, sum(t.numel() for t in lora.values())
    pipe.load_lora_weights(lora, adapter_name=LCM_ADAPTER, low_cpu_mem_usage=True)
    if LCM_ADAPTER not in pipe.get_list_adapters().get("unet", []):
        raise RuntimeError(f"{config.name}: the LCM-LoRA did not load into the UNet")
    pipe.fuse_lora(adapter_names=[LCM_ADAPTER])
    if device != "cpu":
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return {
        "lora_modules": lora_modules,
        "lora_params_m": round(lora_params / 1e6, 1),
        "unet_params_m": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
    }


def count_tflop_per_image(pipe, config: Config) -> tuple[float, bool]:
    """Dense FLOPs (matmuls, convolutions, attention) of one batch-1 call, by torch's counter.

    Also says whether the image came out flat (one value per channel): random fp16 weights that
    overflow give NaN, which PIL turns into a black image that encodes faster than a real one.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        image = pipe(
            prompt=[PROMPT],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=config.size_px,
            height=config.size_px,
            output_type="pil",
        ).images[0]
    flat = all(low == high for low, high in image.getextrema())
    return counter.get_total_flops() / 1e12, flat


# ---------------------------------------------------------------------------------------------
# 3. The two loops


def job_record(index: int, size_px: int):
    """A queued job as the repository's claim returns it (the shape of tests/helpers.py's builder)."""
    from lcmq.repository import JobRecord

    return JobRecord(
        id=f"job{index}",
        batch_id="bench",
        index=index,
        state="running",
        prompt=PROMPT,
        negative_prompt="",
        seed=index,
        steps=STEPS,
        guidance=GUIDANCE,
        width=size_px,
        height=size_px,
        meta={},
        attempts=1,
        worker="bench",
        error=None,
        key=None,
        sha256=None,
        render_ms=None,
        batch_size=None,
        warning=None,
        dispatched_at=None,
        created_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
    )


class MemoryRepository:
    """The repository calls a render task makes, in memory: every job is free to claim."""

    def __init__(self, profile: str):
        from lcmq.repository import BatchRecord

        self.batch = BatchRecord(
            id="bench",
            name=None,
            profile=profile,
            total=0,
            seed=0,
            output="",
            options={},
            created_at=datetime.now(UTC),
            idempotency_key=None,
            priority=0,
            canceled_at=None,
            published_at=None,
            manifest_at=None,
        )
        self.queued: dict[str, Any] = {}
        self.recorded = 0
        self.failures: list[str] = []

    def get_batch(self, batch_id: str):
        return self.batch

    def claim(self, job_ids, worker: str, lease_s: float, max_attempts: int | None = None) -> list:
        return [self.queued.pop(job_id) for job_id in job_ids if job_id in self.queued]

    def extend_leases(self, job_ids, worker: str, lease_s: float) -> int:
        return len(job_ids)

    def record_successes(self, results, worker: str) -> int:
        self.recorded += len(results)
        return len(results)

    def record_failure(self, job_ids, worker: str, error: str) -> int:
        self.failures.append(error)
        return len(job_ids)

    def release(self, job_ids, worker: str, error: str | None, *, max_handbacks: int):
        from lcmq.repository import HandBack

        self.failures.append(f"released: {error}")
        return HandBack(requeued=list(job_ids), failed=[], handbacks=1)

    def manifest_version(self, batch_id: str) -> None:
        return None  # never finished: the benchmark writes no manifest


def memory_storage():
    """lcmq's Storage interface in memory; keeps each object's size and sha256, not its bytes."""
    from lcmq.storage import Storage, check_key, sha256_hex

    class MemoryStorage(Storage):
        def __init__(self):
            self.objects: dict[str, tuple[int, str]] = {}

        def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
            self.objects[check_key(key)] = (len(data), sha256_hex(data))

        def put_file(self, key: str, path, content_type: str) -> None:
            self.put(key, path.read_bytes(), content_type, {})

        def get(self, key: str) -> bytes:
            raise NotImplementedError("the benchmark's storage keeps no bytes")

        def exists(self, key: str) -> bool:
            return key in self.objects

        def stored_sha256(self, key: str) -> str | None:
            return self.objects[key][1] if key in self.objects else None

        def list_keys(self, prefix: str) -> list[str]:
            return sorted(key for key in self.objects if key.startswith(prefix))

        def url(self, key: str) -> str:
            return f"memory://{key}"

    return MemoryStorage()


def bare_step(pipe, config: Config, batch: int) -> Callable[[], dict[str, float]]:
    """pipe(...) then PNG encoding, nothing else, as bench/overhead.py's bare loop; ms per part."""
    import torch

    from worker.encode import encode_png

    def step() -> dict[str, float]:
        started = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]  # as worker.render does
        images = pipe(
            prompt=[PROMPT] * batch,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=config.size_px,
            height=config.size_px,
            generator=generators,
            output_type="pil",
        ).images
        rendered = time.perf_counter()  # PIL images: the GPU work is done
        for image in images:
            encode_png(image, BARE_PARAMETERS)
        return {"pipe_ms": (rendered - started) * 1000, "png_ms": (time.perf_counter() - rendered) * 1000}

    return step


def lcmq_step(loaded, config: Config, batch: int, chunk_jobs: int) -> Callable[[], dict[str, float]]:
    """One render task over `chunk_jobs` jobs: the worker's own code (worker.tasks.ChunkRun).

    Claims, micro-batches of `batch`, truncation warnings, worker.render.render, PNG encoding
    with the job's parameters and upload in the background while the next micro-batch renders,
    recording. Only the database and object store are in memory, and the pipeline is this one.
    Each step is one task; it returns while its last micro-batches store (as a worker does), so
    `step.finish` drains the store pipeline at the end of the timed window and returns the parts.
    """
    from unittest import mock

    from worker import tasks

    repo, storage = MemoryRepository(loaded.profile.name), memory_storage()
    next_index = [0]
    store = tasks.pipeline()
    timings_before = [store.timings_snapshot()]

    def check() -> None:
        if repo.failures:
            if "OutOfMemoryError" in repo.failures[0]:
                import torch

                raise torch.cuda.OutOfMemoryError(repo.failures[0])
            raise RuntimeError(f"the lcmq task did not render every job: {repo.failures[0]}")

    def step() -> dict[str, float]:
        jobs = [job_record(next_index[0] + i, config.size_px) for i in range(chunk_jobs)]
        next_index[0] += chunk_jobs
        repo.queued = {job.id: job for job in jobs}
        with (
            mock.patch.object(tasks, "process_clients", return_value=(repo, storage)),
            mock.patch.object(tasks, "pinned_pipeline", return_value=loaded),
        ):
            run = tasks.ChunkRun(repo.batch.id, "bench-gpu")
            run.settings = run.settings.model_copy(update={"batch_size": batch})
            run.run([job.id for job in jobs])  # returns while its last micro-batches store
        check()
        return {}

    def finish() -> dict[str, float]:
        """The tasks' stores drained (inside the timed window); every job recorded; the parts."""
        store.drain()
        check()
        if repo.recorded != next_index[0]:
            raise RuntimeError(f"the lcmq tasks recorded {repo.recorded} of {next_index[0]} jobs")
        after = store.timings_snapshot()
        parts = {part: after[part] - timings_before[0][part] for part in after}
        timings_before[0] = after
        return parts

    step.finish = finish
    return step


@dataclass
class Timing:
    iters: int
    elapsed_s: float
    parts_ms: dict[str, float]  # the steps' own timings, summed over the timed iterations
    per_iter_s: list[float] = field(default_factory=list)


def timed(
    step: Callable[[], dict[str, float]],
    device: str,
    target_s: float,
    warmup_iters: int = WARMUP_ITERS,
    min_iters: int = MIN_ITERS,
    iter_estimate_s: float | None = None,
) -> Timing:
    """Warm up, size N from the last warmup iteration (or the estimate) to fill ~target_s, time N."""
    last_s = iter_estimate_s or 1.0
    for _ in range(warmup_iters):
        started = time.perf_counter()
        step()
        synchronize(device)
        last_s = time.perf_counter() - started
    iters = max(min_iters, min(MAX_ITERS, math.ceil(target_s / max(last_s, 1e-6))))
    synchronize(device)
    per_iter_s: list[float] = []
    parts_ms: dict[str, float] = {}
    finish = getattr(step, "finish", None)  # lcmq: stores still running after the last task
    if finish:
        finish()  # the warm-up's, outside the window
    started = time.perf_counter()
    for _ in range(iters):
        began = time.perf_counter()
        for part, ms in step().items():
            parts_ms[part] = parts_ms.get(part, 0.0) + ms
        per_iter_s.append(time.perf_counter() - began)
    if finish:
        parts_ms = finish()
    synchronize(device)
    return Timing(iters, time.perf_counter() - started, parts_ms, per_iter_s)


def measure_batch(
    pipe,
    loaded,
    config: Config,
    batch: int,
    chunk_size: int,
    device: str,
    target_s: float,
    tflop_per_image: float,
    matmul: float,
) -> dict[str, Any]:
    """3a then 3b for one batch size."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    chunk_jobs = max(chunk_size, batch)
    with torch.inference_mode():
        bare = timed(bare_step(pipe, config, batch), device, target_s)
        images_bare = batch * bare.iters
        bare_png_img_s = images_bare / bare.elapsed_s
        # The pipeline is warm: one single-micro-batch task warms the worker's threads, and the
        # bare loop's rate sizes the timed tasks (whole chunks, at least one).
        warm = lcmq_step(loaded, config, batch, batch)
        warm()
        warm.finish()
        lcmq = timed(
            lcmq_step(loaded, config, batch, chunk_jobs),
            device,
            target_s,
            warmup_iters=0,
            min_iters=1,
            iter_estimate_s=chunk_jobs / bare_png_img_s,
        )
    images_lcmq = chunk_jobs * lcmq.iters
    img_s = images_bare / (bare.parts_ms["pipe_ms"] / 1000)
    lcmq_img_s = images_lcmq / lcmq.elapsed_s
    return {
        "config": config.name,
        "batch": batch,
        "img_s": img_s,
        "tflop_share": img_s * tflop_per_image / matmul,
        "lcmq_ratio": lcmq_img_s / bare_png_img_s,
        "bare_png_img_s": bare_png_img_s,
        "lcmq_img_s": lcmq_img_s,
        "lcmq_vs_pipe": lcmq_img_s / img_s,
        "pipe_ms": bare.parts_ms["pipe_ms"] / bare.iters,
        "png_ms_per_img": bare.parts_ms["png_ms"] / images_bare,
        **{f"lcmq_{part.removesuffix('_ms')}_ms_per_img": ms / images_lcmq for part, ms in lcmq.parts_ms.items()},
        "iter_ms_median": 1000 * statistics.median(bare.per_iter_s),
        "iters": bare.iters,
        "lcmq_tasks": lcmq.iters,
        "lcmq_chunk_jobs": chunk_jobs,
        "mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


# ---------------------------------------------------------------------------------------------
# 4. Reporting


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def line(pairs: dict[str, Any]) -> str:
    return " ".join(f"{key}={_fmt(value)}" for key, value in pairs.items())


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def best(run: dict[str, Any], measure: str) -> float | None:
    return max((r[measure] for r in run["results"] if "error" not in r), default=None)


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_config(
    config: Config, args, device: str, dtype, matmul: float, target_s: float, record: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Steps 2 and 3 for one config; a batch size that runs out of memory is recorded, not fatal.

    `record` gets the run so far after every batch size (the JSON file survives a timeout).
    """
    import torch

    from lcmq.profiles import BUILTIN_PROFILES
    from worker.pipeline import LoadedPipeline

    # 2. Build, LoRA, FLOP count (before compiling: the counter needs eager ops).
    started = time.perf_counter()
    pipe = build_pipeline(config, device, dtype, args.fp16_vae)
    built = prepare(pipe, config, device, dtype)
    synchronize(device)
    load_s = time.perf_counter() - started
    counted, flat = count_tflop_per_image(pipe, config)
    tflop_per_image = config.tflop_per_image if config.tflop_per_image is not None else counted
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
    loaded = LoadedPipeline(BUILTIN_PROFILES[config.profile], pipe, device, dtype, load_s)
    # The SDXL pipeline decodes in fp32 when an fp16 VAE's config says force_upcast.
    upcast = config.family == "sdxl" and dtype == torch.float16 and pipe.vae.config.force_upcast
    info = {
        "config": config.name,
        "size_px": config.size_px,
        "load_s": load_s,
        **built,
        "lora_rank": config.lora_rank,
        "vae_decode": "float32" if upcast else str(dtype).removeprefix("torch."),
        "compiled": args.compile,
        "tflop_per_image": tflop_per_image,
        "counted_tflop_per_image": counted,
        "images_flat": flat,
    }
    print(f"# {line(info)}", flush=True)
    print(
        f"#   tflop_per_image={_fmt(tflop_per_image)} covers {FLOP_SCOPE}"
        f"{'' if config.tflop_per_image else ' (counted: smoke model)'}",
        flush=True,
    )
    if flat:
        print(
            "#   warning: the images are flat (fp16 overflow in random weights?): PNG times are understated", flush=True
        )
    info["tflop_scope"] = FLOP_SCOPE

    # 3. Every batch size, each with both loops.
    results: list[dict[str, Any]] = []
    run = {"info": info, "results": results}
    for batch in args.batch_sizes:
        try:
            result = measure_batch(
                pipe, loaded, config, batch, args.chunk_size, device, target_s, tflop_per_image, matmul
            )
        except torch.cuda.OutOfMemoryError as exc:
            result = {"config": config.name, "batch": batch, "error": f"OutOfMemoryError: {str(exc)[:200]}"}
        free(device)
        results.append(result)
        print(
            line({k: v for k, v in result.items() if k != "error"} | ({"error": "OOM"} if "error" in result else {})),
            flush=True,
        )
        record(run)
    del pipe, loaded
    free(device)
    return run


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"time ~{QUICK_TARGET_S:g} s per loop instead of ~{TARGET_S:g} s"
    )
    parser.add_argument("--out", type=Path, help="also write every result as JSON here")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (max-autotune-no-cudagraphs); minutes of autotuning per shape",
    )
    parser.add_argument(
        "--fp16-vae",
        action="store_true",
        help="SDXL VAE decodes in fp16 (sdxl-vae-fp16-fix) instead of SDXL base's fp32 upcast",
    )
    parser.add_argument("--config", action="append", help="run only this config (repeatable)")
    parser.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="jobs per lcmq render task (default: lcmq's chunk_size setting; 4 with --cpu-smoke)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the whole code path on CPU: tiny models of both architectures, 64x64, float32",
    )
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = (1, 2) if args.cpu_smoke else BATCH_SIZES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    # 0. Fail fast: no GPU, or a dependency the machine lacks (all of them named at once).
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            f"bench/gpu.py: no CUDA device available (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}): run it on a machine with an NVIDIA GPU, or pass --cpu-smoke "
            "to check the code path on CPU",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    missing = missing_modules()
    if missing:
        print(
            f"bench/gpu.py: missing Python packages: {' '.join(missing)} (bring their wheels; see this "
            "file's docstring)",
            file=sys.stderr,
        )
        return EXIT_MISSING_MODULES

    # The worker modules build lcmq's settings and Celery app on import: keep their embedded
    # broker folder out of the working tree, and serve every profile (no misrouting check).
    home = None
    if "LCMQ_HOME" not in os.environ:
        home = os.environ["LCMQ_HOME"] = tempfile.mkdtemp(prefix="lcmq-bench-gpu-")
    os.environ.pop("LCMQ_WORKER_PROFILE", None)
    try:
        return run_bench(args)
    finally:
        if home:
            shutil.rmtree(home, ignore_errors=True)


def run_bench(args) -> int:
    import torch

    from lcmq.settings import get_settings
    from worker.pipeline import quiet_libraries

    quiet_libraries()
    # SDXL's pipeline calls its own deprecated upcast_vae on every fp32 decode: one warning is noise.
    warnings.filterwarnings("ignore", message=".*upcast_vae.*", category=FutureWarning)
    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.float16
    target_s = 0.2 if args.cpu_smoke else QUICK_TARGET_S if args.quick else TARGET_S
    set_backends()
    if args.chunk_size is None:
        args.chunk_size = 4 if args.cpu_smoke else get_settings().chunk_size
    if args.cpu_smoke:
        torch.set_num_threads(1)  # smoke checks the code path, not speed; one thread stays quick on a busy CPU
    configs = smoke_configs() if args.cpu_smoke else gpu_configs()
    if args.config:
        unknown = set(args.config) - {c.name for c in configs}
        if unknown:
            print(
                f"bench/gpu.py: unknown config(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join(c.name for c in configs)}",
                file=sys.stderr,
            )
            return 1
        configs = [c for c in configs if c.name in args.config]

    env = environment(device)
    print(f"# {line(env)}", flush=True)
    print(
        f"# dtype={str(dtype).removeprefix('torch.')} steps={STEPS} guidance={GUIDANCE:g} "
        f"batch_sizes={','.join(map(str, args.batch_sizes))} target_s={target_s:g} warmup_iters={WARMUP_ITERS} "
        f"lcmq_chunk_size={args.chunk_size} tf32=on sdpa=default channels_last={device != 'cpu'} "
        f"compile={args.compile}",
        flush=True,
    )

    # 1. The dense matmul ceiling.
    matmul = matmul_tflops(device, args.quick)
    print(f"# {line({'matmul_' + k: v for k, v in matmul.items()})}", flush=True)

    # 2-3. Each config: build, then every batch size with both loops.
    report: dict[str, Any] = {
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "matmul": matmul,
        "configs": [],
    }

    def record(run: dict[str, Any]) -> None:
        if not any(seen is run for seen in report["configs"]):
            report["configs"].append(run)
        write_json(args.out, report)

    runs = [bench_config(config, args, device, dtype, matmul["tflops"], target_s, record) for config in configs]

    # 4. Summary: best img/s per architecture, the ceiling, then the best through the lcmq loop.
    summary = {config.summary_key("img_s"): best(run, "img_s") for config, run in zip(configs, runs, strict=False)}
    summary["matmul_tflops"] = matmul["tflops"]
    summary |= {
        config.summary_key("lcmq_img_s"): best(run, "lcmq_img_s") for config, run in zip(configs, runs, strict=True)
    }
    report["summary"] = summary
    write_json(args.out, report)
    print(line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
