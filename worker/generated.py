"""Models lcmq generates itself: random weights, the real SD1.5 and SDXL component classes.

Tests and the demo cannot reach a model hub, so `tiny` (a few MB, 64x64), `tiny-xl` (the SDXL
family in miniature: two text encoders, text_time conditioning) and `sd15-arch` (the real
860M-parameter SD1.5 architecture, for speed measurements) are built here, saved with
`save_pretrained`, and then loaded back through exactly the path real models take. Generation
is seeded, so every machine builds the same weights.

Layout of a generated model under the cache: `<name>/model` (a diffusers folder), `<name>/lcm-lora`
(its random LCM-LoRA) and, for SDXL-family models, `<name>/vae` (a second, differently seeded VAE
that stands in for a replacement VAE such as the fp16-fix one). `<name>-taesd` (ensure_tiny_vae)
is a seeded AutoencoderTiny for that model's latents, the stand-in for madebyollin/taesd(xl):
built apart, so caches made before it existed stay complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("lcmq.worker")

COMPLETE_MARKER = ".lcmq-complete"
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# name -> (unet kwargs, vae block channels, text encoder kwargs, lora rank)
# name → (unet kwargs, vae channels, text encoder kwargs (a pair for SDXL), LCM-LoRA rank)
ARCHITECTURES: dict[str, tuple[Any, ...]] = {
    "tiny-sd15": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        (32, 64),
        dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        4,
    ),
    "sd15-arch": (
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        (128, 256, 512, 512),
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        64,
    ),
    # SDXL topology, narrow and shallow: cross_attention_dim = the two encoders' hidden sizes
    # (32 + 32), projection input = 6 time ids x addition_time_embed_dim + encoder 2's projection.
    "tiny-sdxl": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            cross_attention_dim=64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            use_linear_projection=True,
            norm_num_groups=32,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        (32, 64),
        (
            dict(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                hidden_act="quick_gelu",
                projection_dim=32,
            ),
            dict(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                hidden_act="gelu",
                projection_dim=32,
            ),
        ),
        4,
    ),
}
# Models of the SDXL family: two (tokenizer, text encoder) pairs, the second with a projection.
SDXL_ARCHITECTURES = {"tiny-sdxl"}


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte that byte-level BPE tokenizers (GPT-2, CLIP) use."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer():
    """A CLIP tokenizer over single bytes: no vocabulary files, tokenizes any text."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=77,
    )


def _vae(channels: tuple[int, ...], tiny: bool, sdxl: bool, seed: int):
    import torch
    from diffusers import AutoencoderKL

    # SDXL's VAE has its own latent scale; force_upcast=False as in the fp16-fix VAE.
    extra = {"scaling_factor": 0.13025, "force_upcast": False} if sdxl else {}
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if tiny else 2,
        norm_num_groups=32,
        **extra,
    )


def _text_encoder(kwargs: dict, vocab_size: int, with_projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77, **kwargs
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _build(name: str, folder: Path) -> None:
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet_kwargs, vae_channels, text_kwargs, lora_rank = ARCHITECTURES[name]
    sdxl, tiny = name in SDXL_ARCHITECTURES, name.startswith("tiny")
    betas = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_kwargs)
    vae = _vae(vae_channels, tiny, sdxl, seed=1)
    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    if sdxl:
        # SDXL ships an Euler scheduler; the loader swaps in LCMScheduler exactly as for real models.
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            unet=unet,
            tokenizer=tokenizer,
            tokenizer_2=byte_level_tokenizer(),
            text_encoder=_text_encoder(text_kwargs[0], len(tokenizer), False, seed=2),
            text_encoder_2=_text_encoder(text_kwargs[1], len(tokenizer), True, seed=4),
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **betas),
            add_watermarker=False,
        )
        _vae(vae_channels, tiny, sdxl, seed=5).save_pretrained(folder / "vae")
    else:
        # SD1.5 ships a PNDM scheduler; the loader swaps in LCMScheduler exactly as for real models.
        pipe = StableDiffusionPipeline(
            vae=vae,
            unet=unet,
            tokenizer=tokenizer,
            text_encoder=_text_encoder(text_kwargs, len(tokenizer), False, seed=2),
            scheduler=PNDMScheduler(skip_prk_steps=True, **betas),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder / "model")

    torch.manual_seed(3)
    lora_config = LoraConfig(
        r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
    )
    unet.add_adapter(lora_config)  # type: ignore[attr-defined]  # peft's mixin, untyped in diffusers
    type(pipe).save_lora_weights(
        folder / "lcm-lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        weight_name=LORA_FILE,
        safe_serialization=True,
    )


def ensure_generated(name: str, cache: Path) -> tuple[Path, Path]:
    """The folders of a generated model and its LCM-LoRA, built on first use.

    Built in a temporary folder and renamed into place, so concurrent workers never load a
    half-written model: the first rename wins, the others discard their copy.
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"no generated model named {name!r}; known: {', '.join(ARCHITECTURES)}")
    target = cache / name
    if (target / COMPLETE_MARKER).exists():
        return target / "model", target / "lcm-lora"
    _build_in_place(target, name, _build)
    return target / "model", target / "lcm-lora"


TINY_VAE_SUFFIX = "-taesd"


def _tiny_vae(name: str, seed: int):
    """A seeded AutoencoderTiny whose down/upsampling matches the model's VAE: the published taesd
    layout (4 blocks, 8x) for the real-size architecture, two narrow blocks (2x) for the tiny ones."""
    import torch
    from diffusers import AutoencoderTiny

    factor = 2 ** (len(ARCHITECTURES[name][1]) - 1)
    torch.manual_seed(seed)
    if factor == 8:
        return AutoencoderTiny()  # madebyollin/taesd's own configuration, random weights
    blocks = factor.bit_length()  # one block per resolution: 2x is two blocks
    return AutoencoderTiny(
        encoder_block_out_channels=(16,) * blocks,
        decoder_block_out_channels=(16,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
    )


def ensure_tiny_vae(name: str, cache: Path) -> Path:
    """The folder of a generated model's tiny VAE (`<cache>/<name>-taesd`), built on first use
    and renamed into place whole, like the models themselves."""
    if name not in ARCHITECTURES:
        raise KeyError(f"no generated model named {name!r}; known: {', '.join(ARCHITECTURES)}")
    target = cache / f"{name}{TINY_VAE_SUFFIX}"
    if (target / COMPLETE_MARKER).exists():
        return target
    _build_in_place(target, name, _save_tiny_vae)
    return target


def generate_style_lora(model_dir: Path, out: Path, seed: int, rank: int = 4, strength: float = 0.5) -> Path:
    """A random style LoRA for a generated (or any diffusers-folder) model: one `.safetensors`.

    Like the LCM-LoRA above (peft LoraConfig, gaussian, on the UNet's attention projections), but
    lora_B is drawn too: peft starts it at zero, which would make every style a no-op. `seed`
    picks the style; `strength` scales lora_B, i.e. how far the style moves the image. Written
    through a temporary file and renamed, so concurrent callers never read half a file.
    Works for any UNet2DConditionModel folder layout (SD1.5 and SDXL alike: `<model>/unet`).
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = Path(out)
    if out.exists():
        return out
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * strength)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".lora-"))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=out.name, safe_serialization=True
        )
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _vae_factor(model_dir: Path) -> int:
    """How many pixels a side one latent covers: 2 ** (the VAE's blocks - 1)."""
    import json

    config = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def generate_control(
    model_dir: Path, out: Path, kind: str = "controlnet", seed: int = 0, strength: float = 0.5
) -> Path:
    """A random conditioning model for a generated (or any diffusers-folder) SD1.5/SDXL-family
    model, saved with `save_pretrained` into `out` (a folder users' profiles can name).

    - "controlnet": `ControlNetModel.from_unet` (the UNet's encoder weights), its conditioning
      embedding downscaling by the VAE's factor. from_unet starts the output convolutions at zero
      (a new ControlNet changes nothing); here they are drawn, scaled by `strength`, so a control
      image changes the render.
    - "t2i_adapter": a `T2IAdapter` whose features match the UNet's blocks. The XL layout (one
      downsampling block) fits the tiny two-block UNets of both families; at the full SD1.5
      architecture it takes the `full_adapter` layout.
    Written to a temporary folder and renamed: concurrent callers never read half a model.
    """
    import torch
    from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel

    out = Path(out)
    if out.exists():
        return out
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    factor = _vae_factor(Path(model_dir))
    torch.manual_seed(seed)
    model: Any
    if kind == "controlnet":
        steps = factor.bit_length() - 1  # stride-2 convolutions from pixels to latents
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[: steps + 1])
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * strength)
    elif kind == "t2i_adapter":
        channels = list(unet.config.block_out_channels)
        two = len(channels) == 2
        model = T2IAdapter(
            in_channels=3,
            channels=channels,
            num_res_blocks=1 if two else 2,
            downscale_factor=factor * 2 if two else factor,
            adapter_type="full_adapter_xl" if two else "full_adapter",
        )
    else:
        raise ValueError(f"unknown control kind {kind!r}; use controlnet or t2i_adapter")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".control-"))
    try:
        model.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def single_file_control(folder: Path, out: Path) -> Path:
    """A ControlNet folder as one `.safetensors` file (diffusers keys, as SDXL ControlNets are
    shared), which `ControlNetModel.from_single_file(out, config=folder)` loads back."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    out = Path(out)
    if not out.exists():
        model = ControlNetModel.from_pretrained(folder)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, out)
    return out


def _build_in_place(target: Path, name: str, build: Callable[[str, Path], None]) -> None:
    """`build(name, folder)` into a temporary folder beside `target`, renamed into place whole:
    concurrent workers never load a half-written model; the first rename wins, the others
    discard their copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        log.info("generating model", extra={"model": target.name, "path": str(target)})
        build(name, tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tiny_vae(name: str, folder: Path) -> None:
    _tiny_vae(name, seed=6).save_pretrained(folder)
