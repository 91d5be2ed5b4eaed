"""Write an SD1.5-family diffusers folder as one original-layout (LDM) `.safetensors` checkpoint.

Fine-tunes are mostly shared as such single files. diffusers' `from_single_file` reads only the
original Stable Diffusion key layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`): it converts to diffusers keys with its own mapping and takes
the architecture from a `config=` folder. This is the inverse of that mapping, for any SD1.5-
family UNet config (any depth, layers per block, attention or not per block), so lcmq can build a
single-file twin of a generated model and check that both load to the same pipeline. It mirrors
diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`, which is not installed.
Test-only: no worker path writes checkpoints, so it lives with the tests, not in the package.
"""

from __future__ import annotations

import json
from pathlib import Path

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, block by block (ends with '.')."""
    layers = config["layers_per_block"]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    n = len(down_types)
    mapping = {f"{k}.": f"{v}." for k, v in _UNET_TOP.items()}
    for i, block in enumerate(down_types):
        for j in range(layers):
            ldm = 1 + i * (layers + 1) + j
            mapping[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{ldm}.0."
            if "CrossAttn" in block:
                mapping[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{ldm}.1."
        if i < n - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
    for i, block in enumerate(up_types):
        for j in range(layers + 1):
            ldm = i * (layers + 1) + j
            mapping[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{ldm}.0."
            if "CrossAttn" in block:
                mapping[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{ldm}.1."
        if i < n - 1:
            # The upsampler follows the block's last layer: after its attention when it has one.
            slot = 2 if "CrossAttn" in block else 1
            mapping[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{slot}."
    mapping |= {
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    return mapping


def _rename(key: str, prefixes: dict[str, str]) -> tuple[str, str]:
    """(LDM module prefix, rest of the key) for the longest diffusers prefix the key starts with."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if key.startswith(prefix):
            return prefixes[prefix], key[len(prefix) :]
    raise KeyError(f"no original-layout name for {key!r}")


def unet_to_ldm(state: dict, config: dict) -> dict:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        ldm, rest = _rename(key, prefixes)
        if ".resnets." in key:
            for old, new in _UNET_RESNET.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
        out[UNET_PREFIX + ldm + rest] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    n = len(config["down_block_types"])
    prefixes = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        prefixes |= {
            f"{part}.conv_in.": f"{part}.conv_in.",
            f"{part}.conv_out.": f"{part}.conv_out.",
            f"{part}.conv_norm_out.": f"{part}.norm_out.",
            f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
            f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
            f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1.",
        }
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        # The decoder's up blocks are numbered from the bottom in the original layout.
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    out = {}
    for key, value in state.items():
        ldm, rest = _rename(key, prefixes)
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in ldm:
            for old, new in _VAE_ATTENTION.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
            if value.ndim == 2:  # linear in diffusers, a 1x1 convolution in the original
                value = value[:, :, None, None]
        out[VAE_PREFIX + ldm + rest] = value
    return out


def text_encoder_to_ldm(state: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the original layout has it.
    return {
        TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in state.items()
    }


def save_sd15_single_file(model_dir: Path, path: Path) -> Path:
    """One .safetensors file holding the UNet, VAE and text encoder of an SD1.5-family folder."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)

    def part(name: str) -> tuple[dict, dict]:
        folder = model_dir / name
        weights = next(folder.glob("*.safetensors"))
        return load_file(weights), json.loads((folder / "config.json").read_text())

    unet, unet_config = part("unet")
    vae, vae_config = part("vae")
    text, _ = part("text_encoder")
    state = unet_to_ldm(unet, unet_config) | vae_to_ldm(vae, vae_config) | text_encoder_to_ldm(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
