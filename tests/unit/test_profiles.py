"""Profile tables of lcmq.toml: a strict pydantic model (unknown keys and wrong types refused,
named with the file and the profile), built once per version of the file."""

from __future__ import annotations

import os
from typing import get_args

import pytest

from lcmq import keys
from lcmq.errors import ProfileError
from lcmq.profiles import DTYPES, FAMILIES, ProfileTable, get_profile, load_profiles, reset_profiles
from lcmq.spec import JobSpec

pytestmark = pytest.mark.usefixtures("fresh_profiles")


def test_unknown_keys_are_named_with_the_file_and_the_profile(config):
    config.write_text('[profiles.shop]\nfamily = "sd15"\nbase = "/m/shop"\ncolour = 1\nshade = "dark"\n')
    with pytest.raises(ProfileError) as refused:
        load_profiles(config)
    assert str(refused.value) == f"{config}: [profiles.shop]: unknown key(s) colour, shade"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("guidance", '"high"', "guidance: must be a number (got 'high')"),
        ("guidance", "true", "guidance: must be a number (got True)"),
        ("width", "true", "width: must be an integer (got True)"),
        ("steps", "4.0", "steps: must be an integer (got 4.0)"),
        ("base", "5", "base: must be a string (got 5)"),
        ("vae_tiling", '"yes"', "vae_tiling: must be true or false (got 'yes')"),
        ("dtype", '"int8"', "dtype: must be one of auto, float16, bfloat16, float32 (got 'int8')"),
        ("family", '"sd3"', "family: must be one of sd15, sdxl, ssd1b (got 'sd3')"),
    ],
)
def test_wrong_types_are_refused_by_field(config, key, value, message):
    table = {"family": '"sd15"', "base": '"/m/shop"'} | {key: value}
    config.write_text("[profiles.shop]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()))
    with pytest.raises(ProfileError) as refused:
        load_profiles(config)
    assert str(refused.value) == f"{config}: [profiles.shop].{message}"


def test_values_are_kept_as_written_so_keys_stay():
    """`guidance = 1` stays the integer 1: converting it to 1.0 would change the profile's render
    and idempotency keys (recorded before the pydantic model, from the same file)."""
    table = ProfileTable.model_validate({"guidance": 1, "width": 512})
    assert type(table.guidance) is int


def test_a_user_profile_keeps_its_render_key(config):
    config.write_text(
        '[profiles.shop]\nfamily = "sd15"\nbase = "/m/shop"\nguidance = 1\nsteps = 6\n'
        'vae = ""\nattention_slicing = true\n'
        'loras = [{name = "ink", path = "/loras/ink.safetensors", weight = 0.8}]\n'
        '[profiles.sdxl]\nvae = ""\nwidth = 768\n'
    )
    spec = JobSpec(0, "a red fox", "", 42, 4, 1.0, 64, 64)
    profiles = load_profiles(config)
    assert (
        keys.render_key(spec, profiles["shop"], "png")
        == "de8ef7ff00e87d5cea3b1915399c0cf44b6cbd3b320017ae0ee6ab28f2e4d8ea"
    )
    assert (
        keys.render_key(spec, profiles["sdxl"], "png")
        == "10064784e366afc37e7f302b282469cfbbb341ec1824dbf620144d3dcad36fc6"
    )


def test_the_model_names_the_same_choices_as_the_constants():
    assert get_args(get_args(ProfileTable.model_fields["family"].annotation)[0]) == FAMILIES
    assert get_args(get_args(ProfileTable.model_fields["dtype"].annotation)[0]) == DTYPES


def test_profiles_are_built_once_per_version_of_the_file(config):
    config.write_text('[profiles.shop]\nfamily = "sd15"\nbase = "/m/shop"\nsteps = 6\n')
    first = get_profile("shop")
    assert get_profile("shop") is first  # not read and built again for every lookup
    config.write_text('[profiles.shop]\nfamily = "sd15"\nbase = "/m/shop"\nsteps = 8\n')  # same size
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert get_profile("shop").steps == 8  # a changed file is read again


def test_reset_forgets_the_built_profiles(config):
    config.write_text('[profiles.shop]\nfamily = "sd15"\nbase = "/m/shop"\n')
    first = get_profile("shop")
    reset_profiles()
    assert get_profile("shop") is not first and get_profile("shop") == first


def test_a_config_file_that_appears_later_is_read(config):
    with pytest.raises(ProfileError, match="unknown model profile 'shop'"):
        get_profile("shop")
    config.write_text('[profiles.shop]\nfamily = "sdxl"\nbase = "/m/shop"\n')
    assert get_profile("shop").width == 1024
