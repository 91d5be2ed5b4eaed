"""Profiles of the SDXL family, single files, VAEs, dtypes and memory modes: the wiring, no loading.

`plan_load` decides what the loader will do without torch or downloads, so these check that a
profile asks for the right pipeline class, VAE and options on each device.
"""

from __future__ import annotations

import argparse

import pytest

from lcmq.cli import parse_memory_mb
from lcmq.errors import ConfigError, ModelLoadError, ProfileError
from lcmq.profiles import BUILTIN_PROFILES, SDXL_FP16_VAE, load_profiles, preflight
from lcmq.settings import Settings
from worker.memory import candidate_sizes, choose_batch_size
from worker.pipeline import plan_load

# What Profile.to_dict() held before the optional fields: batches' idempotency keys and catalog
# render keys hash it, so an unchanged profile must keep exactly these keys.
ORIGINAL_KEYS = {"name", "family", "base", "lcm_lora", "dtype", "width", "height", "steps", "guidance"}


def _profile(tmp_path, table: str, name: str = "mine"):
    config = tmp_path / "lcmq.toml"
    config.write_text(f"[profiles.{name}]\n{table}\n")
    return load_profiles(config)[name]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tiny", "StableDiffusionPipeline"),
        ("sd15", "StableDiffusionPipeline"),
        ("tiny-xl", "StableDiffusionXLPipeline"),
        ("sdxl", "StableDiffusionXLPipeline"),
        ("ssd1b", "StableDiffusionXLPipeline"),
    ],
)
def test_the_family_picks_the_pipeline_class(name, cls):
    assert plan_load(BUILTIN_PROFILES[name], "cuda").pipeline_class == cls


@pytest.mark.parametrize("name", ["sdxl", "ssd1b"])
def test_sdxl_family_builtins_load_the_fp16_safe_vae(name):
    plan = plan_load(BUILTIN_PROFILES[name], "cuda")
    assert (plan.vae, plan.dtype) == (SDXL_FP16_VAE, "float16") == ("madebyollin/sdxl-vae-fp16-fix", "float16")
    assert plan_load(BUILTIN_PROFILES["sd15"], "cuda").vae is None


def test_new_sdxl_profiles_inherit_the_vae_and_can_turn_it_off(tmp_path):
    assert _profile(tmp_path, 'family = "sdxl"\nbase = "/models/xl-tune"').vae == SDXL_FP16_VAE
    assert _profile(tmp_path, 'family = "sdxl"\nbase = "/models/xl-tune"\nvae = ""').vae is None
    assert _profile(tmp_path, 'vae = ""', name="sdxl").vae is None  # a built-in's, overridden
    assert (
        _profile(tmp_path, 'family = "sd15"\nbase = "/m"\nvae = "stabilityai/sd-vae-ft-mse"').vae
        == "stabilityai/sd-vae-ft-mse"
    )


def test_unset_optional_fields_keep_the_hashed_profile_unchanged(tmp_path):
    for name in ("tiny", "sd15", "sd15-arch", "null", "tiny-xl"):
        assert set(BUILTIN_PROFILES[name].to_dict()) == ORIGINAL_KEYS
    assert set(BUILTIN_PROFILES["sdxl"].to_dict()) == ORIGINAL_KEYS | {"vae"}
    sliced = _profile(tmp_path, "attention_slicing = true", name="tiny")
    assert sliced.to_dict()["attention_slicing"] is True


def test_auto_dtype_follows_the_device_and_explicit_float16_on_the_cpu_is_refused(tmp_path):
    assert plan_load(BUILTIN_PROFILES["sd15"], "cpu").dtype == "float32"  # auto: a CPU worker just runs
    assert plan_load(BUILTIN_PROFILES["sd15"], "cuda").dtype == "float16"
    assert plan_load(BUILTIN_PROFILES["sd15"], "mps").dtype == "float16"
    assert plan_load(BUILTIN_PROFILES["tiny"], "cpu").dtype == "float32"
    half = _profile(tmp_path, 'dtype = "float16"', name="sd15")
    with pytest.raises(ModelLoadError, match=r"profile 'sd15'.*float16 cannot run on the CPU.*\[profiles\.sd15\]"):
        plan_load(half, "cpu")
    with pytest.raises(ProfileError, match="float16"):
        preflight(half, "cpu")  # at worker start, when the device is explicit
    preflight(half, None)  # `auto`: decided in the worker process


def test_memory_modes_reach_the_plan_and_offload_is_cuda_only(tmp_path):
    table = "attention_slicing = true\nvae_tiling = true\nvae_slicing = true\ncpu_offload = true"
    profile = _profile(tmp_path, table, name="tiny")
    on_cuda = plan_load(profile, "cuda")
    assert on_cuda.cpu_offload and not on_cuda.warnings
    assert on_cuda.memory_modes == ("attention_slicing", "vae_slicing", "vae_tiling")
    for device in ("cpu", "mps"):
        plan = plan_load(profile, device)
        assert not plan.cpu_offload and "cpu_offload ignored" in plan.warnings[0]
        assert plan.memory_modes == on_cuda.memory_modes


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('attention_slicing = "yes"', "attention_slicing: must be true or false"),
        ("cpu_offload = 1", "cpu_offload: must be true or false"),
        ("config = 3", "config: must be a string"),
        ('dtype = "float8"', "dtype: must be one of"),
    ],
)
def test_bad_new_fields_are_named(tmp_path, table, message):
    with pytest.raises(ProfileError, match=r"\[profiles\.tiny\]\." + message):
        _profile(tmp_path, table, name="tiny")


def test_single_file_preflight_names_the_profile_and_field(tmp_path):
    checkpoint = tmp_path / "tune.safetensors"
    with pytest.raises(ProfileError, match=r"profile 'mine': base path .*tune\.safetensors does not exist"):
        preflight(_profile(tmp_path, f'family = "sd15"\nbase = "{checkpoint}"\nconfig = "{tmp_path}"'))
    checkpoint.write_bytes(b"not read by preflight")
    with pytest.raises(
        ProfileError,
        match=r"profile 'mine': base .* is a single-file checkpoint, so the profile "
        r"needs config =",
    ):
        preflight(_profile(tmp_path, f'family = "sd15"\nbase = "{checkpoint}"'))
    with pytest.raises(ProfileError, match=r"profile 'mine': config path .*missing-config does not exist"):
        preflight(_profile(tmp_path, f'family = "sd15"\nbase = "{checkpoint}"\nconfig = "{tmp_path}/missing-config"'))
    with pytest.raises(ProfileError, match=r"profile 'mine': config .* without model_index.json"):
        preflight(_profile(tmp_path, f'family = "sd15"\nbase = "{checkpoint}"\nconfig = "{tmp_path}"'))
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ProfileError, match="family 'sd15' expects a StableDiffusionPipeline"):
        preflight(_profile(tmp_path, f'family = "sd15"\nbase = "{checkpoint}"\nconfig = "{tmp_path}/xl"'))
    good = _profile(tmp_path, f'family = "sdxl"\nbase = "{checkpoint}"\nconfig = "{tmp_path}/xl"')
    preflight(good)
    assert plan_load(good, "cuda").single_file and plan_load(good, "cuda").config == f"{tmp_path}/xl"
    assert good.lcm_lora == "latent-consistency/lcm-lora-sdxl"  # chosen by family
    with pytest.raises(ProfileError, match="config is only used with a single-file base"):
        preflight(_profile(tmp_path, f'family = "sdxl"\nbase = "{tmp_path}/xl"\nconfig = "{tmp_path}/xl"'))


def test_generated_refs_pass_preflight():
    preflight(BUILTIN_PROFILES["tiny-xl"])


@pytest.mark.parametrize(
    ("text", "mib"),
    [("6GiB", 6144), ("6G", 6144), ("512MiB", 512), ("512mb", 488), ("8GB", 7629), ("100", 100), ("1.5GiB", 1536)],
)
def test_memory_sizes_parse_to_mib(text, mib):
    assert parse_memory_mb(text) == mib


@pytest.mark.parametrize("text", ["lots", "0", "-1GiB", "0.1KiB"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory_mb(text)


def test_worker_flags_parse():
    from lcmq.cli import build_parser

    args = build_parser().parse_args(["worker", "--model", "tiny-xl", "--max-memory", "6GiB", "--device", "mps"])
    assert (args.max_memory, args.device) == (6144, "mps")


def test_devices_mps_accepted_unknown_refused(monkeypatch):
    from lcmq.settings import get_settings, reset_settings

    assert Settings(device="mps").device == "mps"
    monkeypatch.setenv("LCMQ_DEVICE", "tpu")
    reset_settings()
    try:
        with pytest.raises(ConfigError, match="LCMQ_DEVICE.*'auto', 'cpu', 'cuda' or 'mps'"):
            get_settings()
    finally:
        monkeypatch.undo()
        reset_settings()


def test_batch_size_candidates():
    assert candidate_sizes(1) == [1]
    assert candidate_sizes(4) == [1, 2, 4]
    assert candidate_sizes(6) == [1, 2, 4, 6]


def test_the_largest_batch_size_within_the_budget_is_chosen():
    measured = []

    def peak(size):  # 1000 MiB of weights, 300 MiB per image
        measured.append(size)
        return 1000 + 300 * size

    assert choose_batch_size(peak, budget_mb=1400, max_batch=8) == (1, {1: 1300, 2: 1600})
    assert measured == [1, 2]  # stops at the first size over budget
    assert choose_batch_size(peak, budget_mb=2300, max_batch=8)[0] == 4
    assert choose_batch_size(peak, budget_mb=10**6, max_batch=8)[0] == 8
    assert choose_batch_size(peak, budget_mb=100, max_batch=8)[0] == 1  # never less than one
    out_of_memory = {1: 500.0, 2: 900.0, 4: None}
    assert choose_batch_size(out_of_memory.get, budget_mb=10**6, max_batch=8)[0] == 2
