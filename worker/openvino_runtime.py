"""The OpenVINO runtime of a CPU profile (`runtime = "openvino"`): the same diffusers pipeline,
scheduler loop and seeded torch generators, with the three networks' forwards run by OpenVINO.

Why this route (not optimum-intel's OV pipelines): it keeps lcmq's own pipeline object, so the
LCMScheduler loop, the latents (drawn from the jobs' own CPU generators), the micro-batch loop
and the prompt handling are exactly those of the torch runtime; only the UNet, the VAE decoder
and the text encoder change. optimum-intel brings its own pipeline classes, scheduler copies
and a transformers pin of its own, which our pinned diffusers/transformers do not match.

1. The torch pipeline is loaded as for the torch runtime, its LCM-LoRA (and the profile's style
   LoRAs) fused into the weights: the export holds the fused networks.
2. Each network is converted (`openvino.convert_model`, traced with a small example input; batch,
   height and width left dynamic) and saved as IR (.xml/.bin) under
   `<models dir>/openvino/<key>/`, the key a hash of the profile's model fields and the torch,
   diffusers and openvino versions. Written to a temporary folder and renamed into place, so
   workers starting together never read a half-written export; a second process reads it.
3. Compiled once per process for the CPU with f32 precision (`openvino`: equivalence with torch)
   or bf16 (`openvino-bf16`: about 2x faster on CPUs with AVX512-BF16 or AMX, every pixel a
   little different; the same export, only the compile differs), a latency hint (one
   request at a time, the micro-batch in it) and this process's share of the cores
   (worker/threads.py). OpenVINO's own compiled-model cache (CACHE_DIR) sits beside the IR.
4. The pipeline's `unet`, `vae` and `text_encoder` are replaced by thin modules that call the
   compiled models; the torch weights are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lcmq.profiles import Profile

log = logging.getLogger("lcmq.worker")

# INFERENCE_PRECISION_HINT by runtime: see the module docstring.
PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}
PARTS = ("unet", "text_encoder", "vae_decoder")
EXPORT_FORMAT = 1  # bump when the exported graphs' inputs or outputs change


def library_versions() -> dict[str, str]:
    import diffusers
    import openvino

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "openvino": openvino.__version__}


def export_key(profile: Profile, versions: dict[str, str]) -> str:
    """The export's folder name: what decides the exported weights and graphs, hashed."""
    fields = {
        "family": profile.family,
        "base": profile.base,
        "config": profile.config,
        "lcm_lora": profile.lcm_lora,
        "vae": profile.vae,
        "loras": [dict(entry) for entry in profile.loras],
        "format": EXPORT_FORMAT,
        "versions": versions,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return f"{profile.name}-{digest}"


# --- the networks as traced: plain tensors in, one tensor out --------------------------------


class UNetCore(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class TextCore(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class DecoderCore(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def _examples(pipe) -> dict[str, tuple[torch.nn.Module, tuple, list]]:
    """Per part: the module traced, its example input, and its input shapes (-1: dynamic)."""
    import openvino as ov

    channels = pipe.unet.config.in_channels
    tokens = pipe.tokenizer.model_max_length
    hidden = pipe.text_encoder.config.hidden_size
    latent = pipe.vae.config.latent_channels
    side = 8  # small: tracing cost only; the shapes are dynamic
    f32, i64 = ov.Type.f32, ov.Type.i64
    return {
        "unet": (
            UNetCore(pipe.unet),
            (torch.randn(1, channels, side, side), torch.tensor([999.0]), torch.randn(1, tokens, hidden)),
            [([-1, channels, -1, -1], f32), ([1], f32), ([-1, tokens, hidden], f32)],
        ),
        "text_encoder": (
            TextCore(pipe.text_encoder),
            (torch.zeros(1, tokens, dtype=torch.int64),),
            [([-1, tokens], i64)],
        ),
        "vae_decoder": (
            DecoderCore(pipe.vae),
            (torch.randn(1, latent, side, side),),
            [([-1, latent, -1, -1], f32)],
        ),
    }


def export(pipe, folder: Path) -> float:
    """Convert the (fused) networks and save them as IR in `folder`; the seconds it took."""
    import openvino as ov

    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # as any folder of the models dir (mkdtemp makes it 0700)
    try:
        # The tracer warns of every Python branch on a shape; the shapes it fixes are the
        # ones the pipeline always passes (77 tokens, causal mask), so the warnings are noise.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for part, (module, example, shapes) in _examples(pipe).items():
                model = ov.convert_model(module.eval(), example_input=example, input=shapes)
                ov.save_model(model, staging / f"{part}.xml", compress_to_fp16=False)
                del model  # one network's graph in memory at a time
        try:
            staging.rename(folder)  # atomic: another process's finished export is left as it is
        except OSError:
            if not (folder / "vae_decoder.xml").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return time.perf_counter() - started


# --- the compiled networks, as modules the pipeline calls -----------------------------------


class Compiled(torch.nn.Module):
    """A pipeline component whose forward runs an OpenVINO compiled model on the CPU."""

    def __init__(self, compiled, config):
        super().__init__()
        self.compiled = compiled
        self.config = config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        # A request per call: a threads pool may call one pipeline from several threads.
        request = self.compiled.create_infer_request()
        request.infer([x.detach().numpy() for x in inputs], share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


class OVUNet(Compiled):
    def forward(self, sample, timestep, encoder_hidden_states, *_, return_dict=True, **unused):
        # Conditioning the export does not take (SDXL's added_cond_kwargs, adapter residuals)
        # belongs to profiles and jobs refused at profile load and at submit.
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(1)
        return (self.run(sample.float(), timestep, encoder_hidden_states.float()),)


class OVTextEncoder(Compiled):
    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=True):
        return (self.run(input_ids.to(torch.int64)),)


class OVVae(Compiled):
    def decode(self, latents, return_dict=True, generator=None):
        return (self.run(latents.float()),)


@dataclass
class OpenVinoLoad:
    folder: Path
    exported: bool  # this process exported (False: read an earlier export)
    export_s: float
    compile_s: float
    threads: int


def compile_config(runtime: str, threads: int, cache_dir: Path) -> dict[str, str]:
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(threads),
        "INFERENCE_PRECISION_HINT": PRECISION[runtime],
        "CACHE_DIR": str(cache_dir),
    }


def use_openvino(pipe, profile: Profile, models_path: Path, threads: int) -> OpenVinoLoad:
    """Steps 2–4 of the module docstring on a loaded, fused torch pipeline (changed in place)."""
    import openvino as ov

    folder = models_path / "openvino" / export_key(profile, library_versions())
    exported, export_s = False, 0.0
    if not all((folder / f"{part}.xml").exists() for part in PARTS):
        export_s = export(pipe, folder)
        exported = True
    started = time.perf_counter()
    core = ov.Core()
    config = compile_config(profile.runtime, threads, folder.parent / "compiled")
    compiled = {part: core.compile_model(str(folder / f"{part}.xml"), "CPU", config) for part in PARTS}
    pipe.unet = OVUNet(compiled["unet"], pipe.unet.config)  # the torch weights go with the old modules
    pipe.text_encoder = OVTextEncoder(compiled["text_encoder"], pipe.text_encoder.config)
    pipe.vae = OVVae(compiled["vae_decoder"], pipe.vae.config)
    compile_s = time.perf_counter() - started
    log.info(
        "openvino runtime",
        extra={
            "profile": profile.name,
            "export": str(folder),
            "exported": exported,
            "export_s": round(export_s, 2),
            "compile_s": round(compile_s, 2),
            "threads": threads,
            "precision": PRECISION[profile.runtime],
            "pid": os.getpid(),
        },
    )
    return OpenVinoLoad(folder, exported, export_s, compile_s, threads)
