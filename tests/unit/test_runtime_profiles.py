"""`runtime = "openvino"` in a profile: validated at profile load (file, line, field), refused
where a worker's device is not the CPU, and the job kinds it cannot render refused at submit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lcmq import keys
from lcmq.errors import InputError, ProfileError
from lcmq.profiles import BUILTIN_PROFILES, load_profiles, preflight
from lcmq.spec import BatchOptions, RowValidator, read_rows, validate_rows

TINY_OV = replace(BUILTIN_PROFILES["tiny"], runtime="openvino")


pytestmark = pytest.mark.usefixtures("fresh_profiles")


def test_runtime_defaults_to_torch_and_openvino_is_kept(config):
    config.write_text('[profiles.tiny]\nruntime = "openvino"\n')
    profiles = load_profiles(config)
    assert profiles["tiny"].runtime == "openvino"
    assert profiles["tiny"].to_dict()["runtime"] == "openvino"
    assert profiles["sd15"].runtime == "torch" and "runtime" not in profiles["sd15"].to_dict()


def test_openvino_bf16_is_a_runtime_of_its_own(config):
    config.write_text('[profiles.tiny]\nruntime = "openvino-bf16"\n')
    bf16 = load_profiles(config)["tiny"]
    assert keys.model_identity(bf16)["runtime"] == "openvino-bf16"
    assert keys.profile_identity(bf16) != keys.profile_identity(TINY_OV)  # other pixels, other render key


def test_an_unknown_runtime_is_refused_by_field(config):
    config.write_text('[profiles.tiny]\nruntime = "onnx"\n')
    with pytest.raises(ProfileError) as refused:
        load_profiles(config)
    assert (
        str(refused.value)
        == f"{config}: [profiles.tiny].runtime: must be one of torch, openvino, openvino-bf16 (got 'onnx')"
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('family = "sdxl"\nbase = "/m/xl"\n', "openvino serves the sd15 family only (this profile is 'sdxl')"),
        ('family = "sd15"\nbase = "/m/a"\ndtype = "bfloat16"\n', 'exports float32 weights; set dtype = "float32"'),
        ('family = "sd15"\nbase = "/m/a"\ncpu_offload = true\n', "cpu_offload (a CUDA option) cannot be set"),
        ('family = "sd15"\nbase = "/m/a"\n[profiles.shop.controls]\nedges = "/m/canny"\n', "cannot serve ControlNet"),
        (
            'family = "sd15"\nbase = "/m/a"\nvae_decoder = "tiny"\ntiny_vae = "madebyollin/taesd"\n',
            'exports the full VAE decoder; vae_decoder = "tiny" needs runtime torch',
        ),
    ],
)
def test_what_openvino_cannot_serve_is_refused_with_file_line_and_field(config, table, message):
    # The runtime line is line 3: the message points at it, whatever else the table holds.
    head, _, rest = table.partition("\n")
    config.write_text(f'[profiles.shop]\n{head}\nruntime = "openvino"\n{rest}')
    with pytest.raises(ProfileError) as refused:
        load_profiles(config)
    assert str(refused.value).startswith(f"{config}:3: [profiles.shop].runtime: ")
    assert message in str(refused.value)


def test_a_worker_on_another_device_is_refused_before_loading():
    preflight(TINY_OV, "cpu")
    preflight(TINY_OV, None)  # auto: decided when the worker picks its device
    with pytest.raises(ProfileError, match="runtime openvino runs on the CPU device only .*'cuda'.* --device cpu"):
        preflight(TINY_OV, "cuda")


def test_the_runtime_is_in_the_render_key_and_the_model_identity_only_when_not_torch():
    tiny = BUILTIN_PROFILES["tiny"]
    assert "runtime" not in keys.profile_identity(tiny) and "runtime" not in keys.model_identity(tiny)
    assert keys.model_identity(TINY_OV) == keys.model_identity(tiny) | {"runtime": "openvino"}
    assert keys.profile_identity(TINY_OV)["runtime"] == "openvino"


def _validate(folder: Path, rows: list[dict], profile=TINY_OV, **flags):
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validator = RowValidator(BatchOptions(model=profile.name, **flags), profile, str(path), base_dir=folder)
    return path, list(validate_rows(read_rows(path), validator))


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"init_image": "cat.png"}, "init_image", "renders text-to-image only (no img2img)"),
        ({"loras": [{"name": "ink", "path": "ink.safetensors"}]}, "loras", "renders the profile's own style LoRAs"),
    ],
)
def test_rows_openvino_cannot_render_are_refused_at_submit(tmp_path, row, field, message):
    (tmp_path / "cat.png").write_bytes(b"x")
    (tmp_path / "ink.safetensors").write_bytes(b"x")
    with pytest.raises(InputError) as refused:
        _validate(tmp_path, [{"prompt": "a fox"}, {"prompt": "a cat"} | row])
    assert (refused.value.line, refused.value.field) == (2, field)
    assert f"profile tiny runs on openvino, which {message}" in refused.value.message
    _, specs = _validate(tmp_path, [{"prompt": "a cat"} | row], profile=BUILTIN_PROFILES["tiny"])
    assert len(specs) == 1  # the torch runtime renders it


def test_a_lora_flag_is_refused_as_the_flag_and_the_profiles_own_loras_pass(tmp_path):
    ink = tmp_path / "ink.safetensors"
    ink.write_bytes(b"x")
    with pytest.raises(InputError) as refused:
        _validate(tmp_path, [{"prompt": "a fox"}], loras=({"name": "ink", "path": str(ink)},))
    assert (refused.value.line, refused.value.field) == (None, "--lora")
    own = replace(TINY_OV, loras=({"name": "ink", "path": str(ink), "weight": 0.5},))
    _, specs = _validate(tmp_path, [{"prompt": "a fox"}], profile=own)
    assert specs[0].loras == own.loras  # the set fused into its export
